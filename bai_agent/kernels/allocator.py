"""
Which share of this machine each kernel gets: CPU, memory and NVIDIA devices.

A manager asks with the ``resources`` argument of ``CreateKernel`` (PROTOCOL.md section 2);
``parse_resource_request`` validates it into a ``ResourceRequest``, and ``Allocator``
turns a request into a ``Grant`` that the kernel record shows (section 5) and the
container is created with.

Requests:

- ``cpu``: cores, a finite number; precision is a millicore (more decimals are rounded),
  at least ``MIN_CPU`` (Docker refuses a CFS quota under 1 ms a period). Default
  ``DEFAULT_CPU`` (one core), or the whole machine's CPU capacity when that is smaller.
- ``mem``: bytes, an int or a size string (``512m``, ``2g``), at least ``MIN_MEM`` (Docker
  refuses a smaller memory limit). Default ``DEFAULT_MEM`` (512 MiB), or the machine's
  memory capacity when that is smaller.
- ``cuda.device``: how many NVIDIA devices, a non-negative int; default 0.
- ``scratch``: the most the kernel's home may hold, bytes or a size string, at least
  ``MIN_SCRATCH``; default the agent's ``--default-scratch-size`` (or the scratch root's
  size when that is smaller). Accounted like memory against the scratch root's size,
  when the capacity knows it, so that a full home is the kernel's ``ENOSPC``, never the
  host's.

A request larger than the machine's capacity can never fit and says so; one that fits the
machine but not what is free now says what is free. Both are ``InsufficientResources``.

Grants, and the pinning rule:

- CPU and memory are accounted (in millicores and bytes) against the capacity: the sum of
  the grants never exceeds it.
- A whole number of cores is pinned with a cpuset, and gets no CFS quota. The cores are the
  least loaded pinnable ones, where a core's load is the number of whole-core grants pinned
  to it, ties going to the lowest core number. So a whole-core grant has its cores to itself
  while enough cores are unpinned; only when too few are (``cpu_cores`` shorter than the
  capacity, or grants restored from an earlier layout) does it share the least loaded ones.
  A whole-core request of more cores than can be pinned at all gets a quota instead.
- A fraction of a core gets a CFS quota (``cpu * period``) and no cpuset: it may run on
  every core. An empty cpuset always means "not pinned, limited by quota".
- Pinnable cores are ``cpu_cores`` (default every core of the machine) when the capacity
  covers them all. When ``--reserved-cpu`` leaves a capacity of ``c`` cores, only the last
  ``floor(c)`` of ``cpu_cores`` are pinned to, leaving the lowest-numbered cores, where the
  host's own daemons and interrupts usually run, to the host.
- NVIDIA devices are granted by NVML index, the lowest free ones first.

The allocator is not thread-safe: it lives on the reactor thread, and the kernel registry
serialises the calls for one kernel.
"""

from __future__ import annotations

import heapq
import math
import os
from typing import Any

import attrs
from twisted.logger import Logger

from bai_agent.node.capacity import Capacity
from bai_agent.node.gpus import GpuDevice
from bai_agent.protocol.errors import InsufficientResources, InvalidRequest
from bai_agent.values import parse_size

log = Logger()

DEFAULT_CPU = 1.0
DEFAULT_MEM = 512 * (1 << 20)
MIN_CPU = 0.01
MIN_MEM = 6 * (1 << 20)
MIN_SCRATCH = 16 * (1 << 20)
CPU_PERIOD_US = 100_000
REQUEST_KEYS = ("cpu", "mem", "cuda.device", "scratch")

_MILLI = 1000
_MIN_MILLICORES = round(MIN_CPU * _MILLI)


@attrs.frozen
class ResourceRequest:
    """What a kernel asks for: ``cpu`` cores (to a millicore), ``mem`` bytes, ``cuda_devices`` devices."""

    cpu: float
    mem: int
    cuda_devices: int = 0
    scratch: int = 0

    @property
    def millicores(self) -> int:
        return round(self.cpu * _MILLI)

    @property
    def whole_cores(self) -> int | None:
        """The number of cores when ``cpu`` is whole, else ``None``."""
        millicores = self.millicores
        return millicores // _MILLI if millicores % _MILLI == 0 else None


@attrs.frozen
class Grant:
    """
    What a kernel got. ``cpuset`` names the cores it is pinned to (empty: not pinned, and
    ``cpu_quota_us`` limits it instead); ``cuda_devices`` are NVML indices.
    """

    kernel_id: str
    cpu: float
    mem: int
    cpuset: tuple = ()
    cpu_quota_us: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    cuda_devices: tuple = ()
    scratch: int = 0  # bytes the home may hold; 0: not limited (a kernel of an older agent)

    @property
    def millicores(self) -> int:
        return round(self.cpu * _MILLI)

    def to_json(self) -> dict:
        """The ``resources`` of the kernel record (PROTOCOL.md sections 5 and 6)."""
        return {
            "cpu": self.cpu,
            "mem": self.mem,
            "cpuset": ",".join(str(core) for core in self.cpuset),
            "cuda.device": list(self.cuda_devices),
            "scratch": self.scratch,
        }

    @classmethod
    def from_json(cls, kernel_id: str, resources: dict) -> Grant:
        """
        The grant a kernel record's ``resources`` describe, for ``Allocator.restore`` after
        an agent restart; ``ValueError`` when they are malformed.
        """
        try:
            cpu = float(resources["cpu"])
            mem = int(resources["mem"])
            cpuset_text = str(resources.get("cpuset", "")).strip()
            cpuset = tuple(int(core) for core in cpuset_text.split(",")) if cpuset_text else ()
            cuda_devices = tuple(int(index) for index in resources.get("cuda.device", ()))
            scratch = int(resources.get("scratch", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a grant of kernel {kernel_id}: {resources!r} ({error})") from None
        if not math.isfinite(cpu) or cpu <= 0 or mem <= 0 or scratch < 0:
            raise ValueError(f"not a grant of kernel {kernel_id}: {resources!r}")
        quota = None if cpuset else round(cpu * CPU_PERIOD_US)
        return cls(
            kernel_id=kernel_id,
            cpu=cpu,
            mem=mem,
            cpuset=cpuset,
            cpu_quota_us=quota,
            cuda_devices=cuda_devices,
            scratch=scratch,
        )


def parse_resource_request(resources: Any, capacity: Capacity, default_scratch: int = 0) -> ResourceRequest:
    """
    The request in a ``CreateKernel``'s ``resources`` (decoded JSON).

    ``InvalidRequest`` names the bad key; ``InsufficientResources`` when the request is
    larger than ``capacity``, the whole machine, so that it can never fit.
    """
    if not isinstance(resources, dict):
        raise InvalidRequest(f"resources must be an object, not {_json_type(resources)}")
    unknown = sorted(repr(key) for key in resources if key not in REQUEST_KEYS)
    if unknown:
        raise InvalidRequest(
            f"resources has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            f" (known: {', '.join(REQUEST_KEYS)})"
        )
    capacity_millicores = _capacity_millicores(capacity)
    if "cpu" in resources:
        millicores = _parse_millicores(resources["cpu"])
    else:
        millicores = min(round(DEFAULT_CPU * _MILLI), capacity_millicores)
    if "mem" in resources:
        mem = _parse_mem(resources["mem"])
    else:
        mem = min(DEFAULT_MEM, capacity.mem)
    cuda_devices = _parse_cuda_devices(resources.get("cuda.device", 0))
    if "scratch" in resources:
        scratch = _parse_scratch(resources["scratch"])
    else:
        scratch = min(default_scratch, capacity.scratch) if capacity.scratch else default_scratch
    whole_machine = (capacity_millicores, capacity.mem, capacity.cuda_device)
    never_fits = _excess(millicores, mem, cuda_devices, *whole_machine, "in the whole machine")
    if capacity.scratch and scratch > capacity.scratch:
        never_fits.append(f"scratch {_bytes(scratch)} asked, {_bytes(capacity.scratch)} in the whole machine")
    if never_fits:
        raise InsufficientResources(f"the request can never fit this agent: {'; '.join(never_fits)}")
    return ResourceRequest(cpu=millicores / _MILLI, mem=mem, cuda_devices=cuda_devices, scratch=scratch)


def _parse_millicores(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"resources.cpu must be a number of cores, not {_json_type(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"resources.cpu must be a finite number of cores, not {value!r}")
    # An int stays exact however large; a float is rounded to a millicore (a huge one is
    # whole anyway, and value * 1000 could overflow to inf).
    if isinstance(value, int) or abs(value) >= 1e15:
        millicores = int(value) * _MILLI
    else:
        millicores = round(value * _MILLI)
    if millicores < _MIN_MILLICORES:
        raise InvalidRequest(f"resources.cpu must be at least {MIN_CPU} cores, not {value!r}")
    return millicores


def _parse_mem(value) -> int:
    return _parse_bytes("mem", value, MIN_MEM, "512m")


def _parse_scratch(value) -> int:
    return _parse_bytes("scratch", value, MIN_SCRATCH, "10g")


def _parse_bytes(key, value, minimum, example) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"resources.{key} must be bytes or a size like '{example}', not {_json_type(value)}")
    try:
        size = parse_size(value)
    except (ValueError, OverflowError) as error:
        raise InvalidRequest(f"resources.{key}: {error}") from None
    if size < minimum:
        raise InvalidRequest(f"resources.{key} must be at least {_bytes(minimum)}, not {value!r}")
    return size


def _parse_cuda_devices(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"resources.cuda.device must be a non-negative integer, not {value!r}")
    return value


class Allocator:
    """
    The grants of this agent's kernels, within ``capacity``, over ``gpus`` and ``cpu_cores``.

    ``gpus`` are the devices to grant; when ``capacity.cuda_device`` disagrees with them
    (the two were discovered at different moments), the devices win.
    """

    def __init__(self, capacity: Capacity, gpus: list[GpuDevice], cpu_cores: list[int] | None = None):
        if cpu_cores is None:
            cpu_cores = list(range(os.cpu_count() or 1))
        cores = sorted(set(cpu_cores))
        if not cores or any(not isinstance(core, int) or core < 0 for core in cores):
            raise ValueError(f"cpu_cores must name at least one core: {cpu_cores!r}")
        gpu_indices = sorted(gpu.index for gpu in gpus)
        if len(set(gpu_indices)) != len(gpu_indices):
            raise ValueError(f"GPU indices must be distinct: {gpu_indices!r}")
        if capacity.cuda_device != len(gpu_indices):
            log.warn(
                "capacity counts {counted} NVIDIA devices but {discovered} were discovered; granting those",
                counted=capacity.cuda_device,
                discovered=len(gpu_indices),
            )
            capacity = attrs.evolve(capacity, cuda_device=len(gpu_indices))
        self.capacity = capacity
        self._capacity_millicores = _capacity_millicores(capacity)
        whole_capacity = self._capacity_millicores // _MILLI
        self._cores = cores
        # The lowest-numbered cores beyond the capacity stay the host's (see the module docstring).
        self._pinnable_cores = cores[len(cores) - min(whole_capacity, len(cores)) :]
        self._gpu_indices = gpu_indices
        self._grants: dict[str, Grant] = {}
        self._core_load = {core: 0 for core in cores}
        self._free_gpus = set(gpu_indices)
        self._used_millicores = 0
        self._used_mem = 0
        self._used_scratch = 0

    @property
    def pinnable_cores(self) -> tuple:
        return tuple(self._pinnable_cores)

    def allocate(self, kernel_id: str, request: ResourceRequest) -> Grant:
        """
        A grant for ``request``; ``InsufficientResources`` when it does not fit, ``ValueError``
        when ``kernel_id`` has a grant already.
        """
        if kernel_id in self._grants:
            raise ValueError(f"kernel {kernel_id} already has a grant")
        millicores = request.millicores
        if millicores <= 0 or request.mem <= 0 or request.cuda_devices < 0:
            raise ValueError(f"not a request: {request!r}")
        self._check_fits(millicores, request.mem, request.cuda_devices)
        self._check_scratch_fits(request.scratch)
        whole_cores = request.whole_cores
        if whole_cores is not None and whole_cores <= len(self._pinnable_cores):
            cpuset = self._least_loaded_cores(whole_cores)
            quota = None
        else:
            cpuset = ()
            quota = round(millicores * CPU_PERIOD_US / _MILLI)
        cuda_devices = tuple(sorted(self._free_gpus)[: request.cuda_devices])
        grant = Grant(
            kernel_id=kernel_id,
            cpu=millicores / _MILLI,
            mem=request.mem,
            cpuset=cpuset,
            cpu_quota_us=quota,
            cpu_period_us=CPU_PERIOD_US,
            cuda_devices=cuda_devices,
            scratch=request.scratch,
        )
        self._take(grant)
        log.debug("kernel {kernel_id} granted {resources}", kernel_id=kernel_id, resources=grant.to_json())
        return grant

    def restore(self, grant: Grant) -> Grant:
        """
        Take ``grant`` again, as made before an agent restart; ``InsufficientResources``
        when it no longer fits (capacity shrank, a core or device is gone or taken).
        """
        if grant.kernel_id in self._grants:
            raise ValueError(f"kernel {grant.kernel_id} already has a grant")
        millicores = grant.millicores
        if millicores <= 0 or grant.mem <= 0:
            raise ValueError(f"grant of kernel {grant.kernel_id} is empty: {grant!r}")
        self._check_fits(millicores, grant.mem, len(grant.cuda_devices))
        self._check_scratch_fits(grant.scratch)
        unknown_cores = sorted(set(grant.cpuset) - set(self._core_load))
        if unknown_cores or len(set(grant.cpuset)) != len(grant.cpuset):
            raise InsufficientResources(
                f"kernel {grant.kernel_id} was pinned to cores {list(grant.cpuset)}, not all of "
                f"this machine's {_core_list(self._cores)}"
            )
        if len(set(grant.cuda_devices)) != len(grant.cuda_devices):
            raise InsufficientResources(f"kernel {grant.kernel_id} names a device twice: {list(grant.cuda_devices)}")
        taken = sorted(set(grant.cuda_devices) - self._free_gpus)
        if taken:
            raise InsufficientResources(
                f"kernel {grant.kernel_id} had NVIDIA devices {taken}, which are "
                f"{'taken' if set(taken) <= set(self._gpu_indices) else 'not on this machine'}"
            )
        self._take(grant)
        log.debug(
            "kernel {kernel_id} grant restored: {resources}",
            kernel_id=grant.kernel_id,
            resources=grant.to_json(),
        )
        return grant

    def release(self, kernel_id: str) -> bool:
        """Give back the grant of ``kernel_id``; ``False`` (and nothing changes) when it has none."""
        grant = self._grants.pop(kernel_id, None)
        if grant is None:
            return False
        self._used_millicores -= grant.millicores
        self._used_mem -= grant.mem
        self._used_scratch -= grant.scratch
        for core in grant.cpuset:
            self._core_load[core] -= 1
        self._free_gpus.update(grant.cuda_devices)
        log.debug("kernel {kernel_id} released its grant", kernel_id=kernel_id)
        return True

    def grant_of(self, kernel_id: str) -> Grant | None:
        return self._grants.get(kernel_id)

    def grants(self) -> dict[str, Grant]:
        return dict(self._grants)

    def used(self) -> dict:
        """Granted amounts, per slot (``cuda.device`` counts devices; ``scratch`` when accounted)."""
        slots = _slots(self._used_millicores, self._used_mem, len(self._gpu_indices) - len(self._free_gpus))
        if self.capacity.scratch:
            slots["scratch"] = self._used_scratch
        return slots

    def free(self) -> dict:
        slots = _slots(
            self._capacity_millicores - self._used_millicores,
            self.capacity.mem - self._used_mem,
            len(self._free_gpus),
        )
        if self.capacity.scratch:
            slots["scratch"] = self.capacity.scratch - self._used_scratch
        return slots

    def core_load(self) -> dict[int, int]:
        """Per core, the number of whole-core grants pinned to it."""
        return dict(self._core_load)

    def _check_fits(self, millicores: int, mem: int, cuda_devices: int) -> None:
        whole_machine = (self._capacity_millicores, self.capacity.mem, self.capacity.cuda_device)
        never_fits = _excess(millicores, mem, cuda_devices, *whole_machine, "in the whole machine")
        if never_fits:
            raise InsufficientResources(f"the request can never fit this agent: {'; '.join(never_fits)}")
        free_millicores = self._capacity_millicores - self._used_millicores
        free_mem = self.capacity.mem - self._used_mem
        free_gpus = len(self._free_gpus)
        short = _excess(millicores, mem, cuda_devices, free_millicores, free_mem, free_gpus, "free")
        if short:
            raise InsufficientResources(
                f"the request does not fit now: {'; '.join(short)}"
                f" (free: cpu {_cores(free_millicores)}, mem {_bytes(free_mem)}, cuda.device {free_gpus})"
            )

    def _check_scratch_fits(self, scratch: int) -> None:
        if not self.capacity.scratch:
            return
        if scratch > self.capacity.scratch:
            raise InsufficientResources(
                f"the request can never fit this agent: scratch {_bytes(scratch)} asked, "
                f"{_bytes(self.capacity.scratch)} in the whole machine"
            )
        free = self.capacity.scratch - self._used_scratch
        if scratch > free:
            raise InsufficientResources(
                f"the request does not fit now: scratch {_bytes(scratch)} asked, {_bytes(free)} free"
            )

    def _least_loaded_cores(self, count: int) -> tuple:
        chosen = heapq.nsmallest(count, self._pinnable_cores, key=lambda core: (self._core_load[core], core))
        return tuple(sorted(chosen))

    def _take(self, grant: Grant) -> None:
        self._grants[grant.kernel_id] = grant
        self._used_millicores += grant.millicores
        self._used_mem += grant.mem
        self._used_scratch += grant.scratch
        for core in grant.cpuset:
            self._core_load[core] += 1
        self._free_gpus.difference_update(grant.cuda_devices)


def _capacity_millicores(capacity: Capacity) -> int:
    # Never round the capacity up: 6.9996 cores is 6999 millicores, not 7000.
    return max(0, math.floor(capacity.cpu * _MILLI + 1e-6))


def _excess(millicores, mem, cuda_devices, have_millicores, have_mem, have_cuda_devices, having: str) -> list:
    """One phrase per slot where the ask exceeds what there is (``having``: where that is)."""
    excess = []
    if millicores > have_millicores:
        excess.append(f"cpu {_cores(millicores)} asked, {_cores(have_millicores)} {having}")
    if mem > have_mem:
        excess.append(f"mem {_bytes(mem)} asked, {_bytes(have_mem)} {having}")
    if cuda_devices > have_cuda_devices:
        excess.append(f"cuda.device {cuda_devices} asked, {have_cuda_devices} {having}")
    return excess


def _slots(millicores: int, mem: int, cuda_devices: int) -> dict:
    return {"cpu": millicores / _MILLI, "mem": mem, "cuda.device": cuda_devices}


def _cores(millicores: int) -> str:
    if millicores >= 10**18:
        return "more than 10^15"
    if millicores % _MILLI == 0:
        return str(millicores // _MILLI)
    return f"{millicores / _MILLI:.3f}".rstrip("0")


def _bytes(size: int) -> str:
    if size >= 1 << 60:
        return "more than 1 EiB"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0 and size // scale < 10**6:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def _core_list(cores) -> str:
    return ",".join(str(core) for core in cores)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__
