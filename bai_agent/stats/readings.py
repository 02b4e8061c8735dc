"""
The statistics collector's last readings, checked: what the etcd record, the status page
and ``/metrics`` read of them, in one place.

The collector may not have sampled yet (the agent just started), and a sample may hold
odd values. Every reader here answers an empty value then instead of failing, and keeps
only the fields it knows with finite numbers, so that one odd sample (a ``NaN`` from a
device, a missing key) shows as "no reading" rather than breaking a scrape or producing
JSON that a browser refuses. Each reader takes the collector (``stats``), or None.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bai_agent.stats.collector import SAMPLE_KEYS

if TYPE_CHECKING:
    from bai_agent.stats.collector import StatsCollector

KERNEL_SAMPLE_FIELDS = SAMPLE_KEYS


def number(value: object) -> float | None:
    """``value`` when it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def text_or_none(value: object) -> str | None:
    """``value`` when it is a str, else None."""
    return value if isinstance(value, str) else None


def mapping(value: object) -> dict[str, Any]:
    """``value`` when it is a dict, else an empty one."""
    return value if isinstance(value, dict) else {}


def kernel_sample(sample: object) -> dict[str, float] | None:
    """The known, numeric fields of one kernel sample; None when there is none."""
    if not isinstance(sample, dict):
        return None
    checked: dict[str, float] = {}
    for field in KERNEL_SAMPLE_FIELDS:
        value = number(sample.get(field))
        if value is not None:
            checked[field] = value
    return checked


def kernel_samples(stats: StatsCollector | None) -> dict[str, dict[str, float]]:
    """``{kernel_id: checked sample}`` of the collector's last round; ``{}`` without one."""
    if stats is None:
        return {}
    samples = stats.latest_all() or {}
    checked = {}
    for kernel_id, sample in samples.items():
        if not isinstance(kernel_id, str):
            continue
        known = kernel_sample(sample)
        if known is not None:
            checked[kernel_id] = known
    return checked


def node_sample(stats: StatsCollector | None) -> dict[str, Any] | None:
    """
    The machine's last sample with checked fields (absent readings become None), or None::

        {"sampled_at", "cpu": {"count", "percent", "per_core": [..]},
         "mem": {"total", "used", "available"}, "disk": {"path", "total", "used", "free"},
         "net": {"rx_bytes", "tx_bytes"},
         "gpus": [{"index", "uuid", "name", "util_percent", "mem_used", "mem_total", "error"}]}
    """
    if stats is None:
        return None
    node = stats.node_latest()
    if not isinstance(node, dict):
        return None
    cpu = mapping(node.get("cpu"))
    mem = mapping(node.get("mem"))
    disk = mapping(node.get("disk"))
    net = mapping(node.get("net"))
    per_core = cpu.get("per_core")
    gpus: list[dict[str, Any]] = []
    for reading in node.get("gpus") or ():
        gpu = mapping(reading)
        index = number(gpu.get("index"))
        if not isinstance(index, int):
            continue
        error = gpu.get("error")
        gpus.append(
            {
                "index": index,
                "uuid": text_or_none(gpu.get("uuid")) or "",
                "name": text_or_none(gpu.get("name")) or "",
                "util_percent": None if error else number(gpu.get("util_percent")),
                "mem_used": None if error else number(gpu.get("mem_used")),
                "mem_total": None if error else number(gpu.get("mem_total")),
                "error": None if error is None else str(error),
            }
        )
    return {
        "sampled_at": number(node.get("sampled_at")),
        "cpu": {
            "count": number(cpu.get("count")),
            "percent": number(cpu.get("percent")),
            "per_core": [number(p) for p in per_core] if isinstance(per_core, (list, tuple)) else [],
        },
        "mem": {key: number(mem.get(key)) for key in ("total", "used", "available")},
        "disk": {
            "path": text_or_none(disk.get("path")),
            **{key: number(disk.get(key)) for key in ("total", "used", "free")},
        },
        "net": {key: number(net.get(key)) for key in ("rx_bytes", "tx_bytes")},
        "gpus": sorted(gpus, key=lambda gpu: gpu["index"]),
    }


def sample_seconds(stats: StatsCollector | None) -> float | None:
    """CPU seconds the collector spent on its last round, or None."""
    return number(getattr(stats, "sample_seconds", None)) if stats is not None else None
