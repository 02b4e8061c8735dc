"""
``fake_backends``: the ``service.Backends`` of an agent built on fakes, for tests that run
the whole composition root on a ``MemoryReactorClock``: ``FakeDockerBackend``,
``MemoryEtcd``, ``FakeRunners``, disk work done at once, plain-directory homes, and a
the capacity of this machine (with the scratch root's disk, and no GPU) unless told
otherwise. The scratch root must exist.
"""

from typing import Any, Optional

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime

from bai_agent.node.capacity import Capacity, detect_capacity
from bai_agent.node.gpus import GpuDevice
from bai_agent.node.scratch import ScratchVolumes, capacity_of
from bai_agent.service import Backends
from bai_agent.stats.cgroups import CgroupReader
from bai_agent.testing.fake_docker import FakeDockerBackend
from bai_agent.testing.fake_runner import FakeRunners
from bai_agent.testing.memory_etcd import MemoryEtcd


def fake_backends(
    clock: IReactorTime,
    scratch_root: str,
    docker: Optional[FakeDockerBackend] = None,
    etcd: Optional[MemoryEtcd] = None,
    runners: Optional[FakeRunners] = None,
    capacity: Optional[Capacity] = None,
    gpus: tuple[GpuDevice, ...] = (),
    nvml: Any = None,
) -> Backends:
    """
    Backends over fakes. ``clock`` drives ``MemoryEtcd``'s leases; ``scratch_root`` is
    where the homes go (plain directories: nothing is mounted). Disk work runs at once,
    since a ``MemoryReactorClock`` never runs what a thread pool hands back to it.
    """
    return Backends(
        docker=docker if docker is not None else FakeDockerBackend(),
        etcd=etcd if etcd is not None else MemoryEtcd(clock=clock),
        connect_runner=(runners if runners is not None else FakeRunners()).connect,
        run_blocking=maybeDeferred,
        cgroups=CgroupReader(),
        scratch_volumes=ScratchVolumes(scratch_root, "dir"),
        capacity=capacity
        if capacity is not None
        else detect_capacity(0, 0, cuda_devices=len(gpus), scratch=capacity_of(scratch_root)),
        gpus=tuple(gpus),
        nvml=nvml,
    )
