"""
What the status page and ``/metrics`` read from an ``AgentState``, in one place, checked.

Statistics come from the stats collector (``state.stats``), which may be absent (not wired,
or the agent just started) or may not have sampled yet. Every reader here answers an empty
value then instead of failing, and keeps only the fields it knows with finite numbers, so
that one odd sample (a ``NaN`` from a device, a missing key) shows as "no reading" rather
than breaking the scrape or producing JSON that a browser refuses.
"""

import math

from bai_agent.stats.collector import SAMPLE_KEYS

KERNEL_SAMPLE_FIELDS = SAMPLE_KEYS


def number(value):
    """``value`` when it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _text(value):
    return value if isinstance(value, str) else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def kernel_sample(sample):
    """The known, numeric fields of one kernel sample; None when there is none."""
    if not isinstance(sample, dict):
        return None
    checked = {}
    for field in KERNEL_SAMPLE_FIELDS:
        value = number(sample.get(field))
        if value is not None:
            checked[field] = value
    return checked


def kernel_samples(state) -> dict:
    """``{kernel_id: checked sample}`` of the collector's last round; ``{}`` without one."""
    stats = getattr(state, "stats", None)
    if stats is None:
        return {}
    samples = stats.latest_all() or {}
    checked = {}
    for kernel_id, sample in samples.items():
        if not isinstance(kernel_id, str):
            continue
        sample = kernel_sample(sample)
        if sample is not None:
            checked[kernel_id] = sample
    return checked


def node_sample(state):
    """
    The machine's last sample with checked fields (absent readings become None), or None::

        {"sampled_at", "cpu": {"count", "percent", "per_core": [..]},
         "mem": {"total", "used", "available"}, "disk": {"path", "total", "used", "free"},
         "net": {"rx_bytes", "tx_bytes"},
         "gpus": [{"index", "uuid", "name", "util_percent", "mem_used", "mem_total", "error"}]}
    """
    stats = getattr(state, "stats", None)
    if stats is None:
        return None
    node = stats.node_latest()
    if not isinstance(node, dict):
        return None
    cpu = _mapping(node.get("cpu"))
    mem = _mapping(node.get("mem"))
    disk = _mapping(node.get("disk"))
    net = _mapping(node.get("net"))
    per_core = cpu.get("per_core")
    gpus = []
    for gpu in node.get("gpus") or ():
        gpu = _mapping(gpu)
        index = number(gpu.get("index"))
        if not isinstance(index, int):
            continue
        error = gpu.get("error")
        gpus.append(
            {
                "index": index,
                "uuid": _text(gpu.get("uuid")) or "",
                "name": _text(gpu.get("name")) or "",
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
            "path": _text(disk.get("path")),
            **{key: number(disk.get(key)) for key in ("total", "used", "free")},
        },
        "net": {key: number(net.get(key)) for key in ("rx_bytes", "tx_bytes")},
        "gpus": sorted(gpus, key=lambda gpu: gpu["index"]),
    }


def sample_seconds(state):
    """CPU seconds the collector spent on its last round, or None."""
    stats = getattr(state, "stats", None)
    return number(getattr(stats, "sample_seconds", None)) if stats is not None else None


def heartbeat_delays(state) -> tuple:
    """(last, largest since start) delay of the etcd heartbeat against its schedule, seconds."""
    etcd = state.etcd
    last = number(getattr(etcd, "heartbeat_delay", 0.0)) if etcd is not None else None
    largest = number(getattr(etcd, "heartbeat_delay_max", 0.0)) if etcd is not None else None
    return (last or 0.0, largest or 0.0)


def journal_size(state) -> tuple:
    """(events kept, last seq) of the event journal; (0, 0) without one."""
    journal = state.journal
    if journal is None:
        return (0, 0)
    return (len(journal), journal.last_seq)


def kernel_gpus(kernel_record) -> list:
    """The NVML indices granted to a kernel (its record's ``resources["cuda.device"]``)."""
    devices = _mapping(kernel_record.get("resources")).get("cuda.device")
    if not isinstance(devices, (list, tuple)):
        return []
    return [device for device in devices if isinstance(device, int) and not isinstance(device, bool)]
