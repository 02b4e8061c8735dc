"""
The NVIDIA devices of this machine, as NVML reports them, and the NVML helpers that
discovery and sampling (``bai_agent.stats.gpu``) share.

Discovery goes through nvidia-ml-py's ``pynvml`` module, injected as ``nvml`` so that tests
use ``bai_agent.testing.fake_nvml.FakeNvml``. A machine without the package, without the
driver, or whose NVML fails in any other way has no GPUs: discovery logs why and never
raises, because an agent without GPUs is still a useful agent.

``GpuDevice.index`` is the NVML index, which is also what the NVIDIA container runtime
means by ``NVIDIA_VISIBLE_DEVICES=0,1``; the UUID names the same device unambiguously.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

log = Logger()

#: The ``pynvml`` module, or ``FakeNvml``: its functions answer ctypes structures and
#: opaque handles that no stubs describe, so it stays untyped here.
Nvml = Any


@attrs.frozen
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_total: int


def discover_gpus(nvml: Nvml | None = None) -> list[GpuDevice]:
    """
    Every device NVML can describe, in index order; ``[]`` when NVML is missing or fails.

    A single device that fails to answer (``NVMLError_GpuIsLost``, ...) is left out with a
    warning and the others are kept: its index stays unused rather than shifting the others.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            log.info("no NVIDIA devices: nvidia-ml-py (pynvml) is not installed")
            return []
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.info("no NVIDIA devices: NVML did not initialise: {error}", error=describe_nvml_error(error))
        return []
    try:
        return _describe_devices(nvml)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as error:
            log.warn("NVML did not shut down cleanly: {error}", error=describe_nvml_error(error))


def _describe_devices(nvml: Nvml) -> list[GpuDevice]:
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as error:
        log.warn("no NVIDIA devices: NVML could not count them: {error}", error=describe_nvml_error(error))
        return []
    devices = []
    for index in range(count):
        try:
            devices.append(_describe_device(nvml, index))
        except Exception as error:
            log.warn("NVIDIA device {index} is left out: {error}", index=index, error=describe_nvml_error(error))
    if devices:
        log.info(
            "NVIDIA devices: {devices}",
            devices=", ".join(f"{device.index}: {device.name} ({device.uuid})" for device in devices),
        )
    else:
        log.info("no NVIDIA devices: NVML reports none")
    return devices


def _describe_device(nvml: Nvml, index: int) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return GpuDevice(
        index=index,
        uuid=nvml_text(nvml.nvmlDeviceGetUUID(handle)),
        name=nvml_text(nvml.nvmlDeviceGetName(handle)),
        memory_total=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
    )


def nvml_text(value: object) -> str:
    """A name or UUID NVML answered, as text."""
    # nvidia-ml-py since 11.515 answers str; older releases and the pynvml package answered bytes.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def describe_nvml_error(error: Exception) -> str:
    """An NVML error for a log line: its class and its text."""
    # str() of an NVMLError is its text alone ("Driver Not Loaded"); the class name says more.
    return f"{type(error).__name__}: {error}"
