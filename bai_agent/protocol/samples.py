"""
The names of the fields of statistics samples: wire vocabulary that managers read.

A kernel sample is what ``GetKernelStats`` answers as ``stats``, what ``DestroyKernel``
answers as its last sample and what the ``kernel-terminated`` event carries (PROTOCOL.md):
a JSON object with exactly the keys of ``SAMPLE_KEYS``. The node sample (the status page's
``/status.json``, and the ``measured`` use in the etcd record) has the sections of
``NODE_SECTIONS`` and one entry per NVIDIA device under ``NODE_GPUS``, each with the keys of
``GPU_SAMPLE_KEYS``.

Stdlib only: managers import this module without the agent's dependencies.
"""

from __future__ import annotations

from typing import Final

# -- a kernel sample --------------------------------------------------------------------

CPU_USED_MS: Final = "cpu_used_ms"  # int, milliseconds of CPU time since the container started
CPU_UTIL: Final = "cpu_util"  # float, percent of one core since the previous sample (0.0 on the first)
MEM_BYTES: Final = "mem_bytes"  # int, bytes of memory in use now
MEM_MAX_BYTES: Final = "mem_max_bytes"  # int, bytes: the most memory in use at any sample (or the cgroup's peak)
IO_READ_BYTES: Final = "io_read_bytes"  # int, bytes read from block devices since the container started
IO_WRITE_BYTES: Final = "io_write_bytes"  # int, bytes written to block devices since the container started
NET_RX_BYTES: Final = "net_rx_bytes"  # int, bytes received by the kernel's network namespace (loopback left out)
NET_TX_BYTES: Final = "net_tx_bytes"  # int, bytes sent by the kernel's network namespace (loopback left out)
PIDS: Final = "pids"  # int, a count of processes and threads in the container now
SCRATCH_BYTES: Final = "scratch_bytes"  # int, bytes the kernel's home (scratch dir) holds
SAMPLED_AT: Final = "sampled_at"  # float, seconds since the Unix epoch when the sample was read

#: Every key of a kernel sample, in the order PROTOCOL.md lists them.
SAMPLE_KEYS: Final[tuple[str, ...]] = (
    CPU_USED_MS,
    CPU_UTIL,
    MEM_BYTES,
    MEM_MAX_BYTES,
    IO_READ_BYTES,
    IO_WRITE_BYTES,
    NET_RX_BYTES,
    NET_TX_BYTES,
    PIDS,
    SCRATCH_BYTES,
    SAMPLED_AT,
)

# -- the node sample --------------------------------------------------------------------

NODE_CPU: Final = "cpu"  # object: count (int, cores), percent (float, percent of all cores), per_core (floats)
NODE_MEM: Final = "mem"  # object: total, used, available (int, bytes)
NODE_DISK: Final = "disk"  # object: path (the scratch root), total, used, free (int, bytes)
NODE_NET: Final = "net"  # object: rx_bytes, tx_bytes (int, bytes since boot, loopback left out)
NODE_GPUS: Final = "gpus"  # list of objects, one per NVIDIA device, keys GPU_SAMPLE_KEYS
# The node sample's time is SAMPLED_AT too. A section that could not be read holds
# SAMPLE_ERROR instead of its numbers.

#: The sections of a node sample that psutil fills, in the order the sample has them.
NODE_SECTIONS: Final[tuple[str, ...]] = (NODE_CPU, NODE_MEM, NODE_DISK, NODE_NET)

SAMPLE_ERROR: Final = "error"  # str, why a node section or a GPU could not be read: "ClassName: text"

# -- one NVIDIA device of the node sample ---------------------------------------------------

GPU_INDEX: Final = "index"  # int, the NVML index (what NVIDIA_VISIBLE_DEVICES names)
GPU_UUID: Final = "uuid"  # str, the device's NVML UUID ("GPU-...")
GPU_NAME: Final = "name"  # str, the product name NVML reports
GPU_UTIL_PERCENT: Final = "util_percent"  # float or null, percent busy; null where NVML cannot tell (MIG)
GPU_MEM_USED: Final = "mem_used"  # int, bytes of device memory in use
GPU_MEM_TOTAL: Final = "mem_total"  # int, bytes of device memory

#: The keys of a device that answered; one that failed has GPU_INDEX, GPU_UUID, GPU_NAME
#: and SAMPLE_ERROR only.
GPU_SAMPLE_KEYS: Final[tuple[str, ...]] = (GPU_INDEX, GPU_UUID, GPU_NAME, GPU_UTIL_PERCENT, GPU_MEM_USED, GPU_MEM_TOTAL)
