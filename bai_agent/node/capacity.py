"""
What this machine offers to kernels: its capacity per resource slot, minus what the
operator reserved for the host (``--reserved-cpu``, ``--reserved-mem``).
"""

from __future__ import annotations

import attrs
import psutil


@attrs.frozen
class Capacity:
    cpu: float
    mem: int
    cuda_device: int
    scratch: int = 0  # bytes of the scratch root's filesystem; 0: not accounted

    def as_slots(self) -> dict[str, float | int]:
        slots: dict[str, float | int] = {"cpu": self.cpu, "mem": self.mem, "cuda.device": self.cuda_device}
        if self.scratch:
            slots["scratch"] = self.scratch
        return slots


def detect_capacity(reserved_cpu: float, reserved_mem: int, cuda_devices: int = 0, scratch: int = 0) -> Capacity:
    """
    The machine's capacity less the reservations (a reservation that leaves nothing is an
    error). ``cuda_devices`` is how many NVIDIA devices NVML found (``node.gpus``).
    """
    cores = psutil.cpu_count(logical=True) or 1
    memory = psutil.virtual_memory().total
    if reserved_cpu >= cores:
        raise ValueError(f"--reserved-cpu {reserved_cpu} leaves nothing of this machine's {cores} cores")
    if reserved_mem >= memory:
        raise ValueError(f"--reserved-mem {reserved_mem} leaves nothing of this machine's {memory} bytes")
    return Capacity(cpu=cores - reserved_cpu, mem=memory - reserved_mem, cuda_device=cuda_devices, scratch=scratch)
