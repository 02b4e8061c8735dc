"""
Statistics of kernels (cgroups, network namespace, scratch dir), of the node (psutil) and
of its GPUs (NVML), sampled periodically by ``StatsCollector``.
"""

from bai_agent.protocol.samples import SAMPLE_KEYS
from bai_agent.stats.cgroups import CgroupReader, detect_cgroup_version
from bai_agent.stats.collector import KernelTarget, StatsCollector, empty_sample
from bai_agent.stats.gpu import GpuStats
from bai_agent.stats.node import NodeStats
from bai_agent.stats.scratch import ScratchSizer

__all__ = [
    "SAMPLE_KEYS",
    "CgroupReader",
    "GpuStats",
    "KernelTarget",
    "NodeStats",
    "ScratchSizer",
    "StatsCollector",
    "detect_cgroup_version",
    "empty_sample",
]
