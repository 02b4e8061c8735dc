"""
What this machine offers to kernels: its capacity per resource slot, minus what the
operator reserved for the host (``--reserved-cpu``, ``--reserved-mem``).
"""

import attrs
import psutil
from twisted.logger import Logger

log = Logger()

SLOTS = ("cpu", "mem", "cuda.device")


def count_cuda_devices(nvml=None) -> int:
    """
    The number of NVIDIA devices NVML reports; 0 when no driver or no nvidia-ml-py.
    ``nvml`` is the ``pynvml`` module (a fake in tests).
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return 0
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.info("no NVIDIA devices: {error}", error=e)
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    finally:
        nvml.nvmlShutdown()


@attrs.frozen
class Capacity:
    cpu: float
    mem: int
    cuda_device: int

    def as_slots(self) -> dict:
        return {"cpu": self.cpu, "mem": self.mem, "cuda.device": self.cuda_device}


def detect_capacity(reserved_cpu: float, reserved_mem: int, nvml=None) -> Capacity:
    """The machine's capacity less the reservations; a reservation larger than the machine is an error."""
    cores = psutil.cpu_count(logical=True) or 1
    memory = psutil.virtual_memory().total
    if reserved_cpu >= cores:
        raise ValueError(f"--reserved-cpu {reserved_cpu} leaves nothing of this machine's {cores} cores")
    if reserved_mem >= memory:
        raise ValueError(f"--reserved-mem {reserved_mem} leaves nothing of this machine's {memory} bytes")
    return Capacity(cpu=cores - reserved_cpu, mem=memory - reserved_mem, cuda_device=count_cuda_devices(nvml))
