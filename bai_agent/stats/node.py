"""
The machine's own statistics, through psutil: CPU per core, memory, the disk that holds
the kernels' scratch dirs, and network traffic.

``psutil`` is injected so that unit tests can pass a stand-in. ``sample`` reads
``/proc`` and calls ``statvfs``: it blocks briefly, so the collector calls it in its
worker thread. A section that fails is reported as ``{"error": "..."}`` (``disk`` keeps
its ``path``) instead of numbers, and never stops the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil

from bai_agent.protocol import samples

#: One section of the node sample: numbers by name, or ``{"error": ...}``.
Section = dict[str, Any]


class NodeStats:
    """
    :param scratch_root: the directory under which kernels' homes live; its filesystem
        is the ``disk`` section.
    :param psutil_module: ``psutil`` or a stand-in with ``cpu_count``, ``cpu_percent``,
        ``virtual_memory``, ``disk_usage`` and ``net_io_counters``.
    """

    def __init__(self, scratch_root: str, psutil_module: Any = psutil) -> None:
        if not isinstance(scratch_root, str) or not scratch_root:
            raise ValueError(f"invalid scratch root {scratch_root!r}")
        self.scratch_root = scratch_root
        self._psutil = psutil_module
        # cpu_percent compares with its previous call; the first call of all answers 0.0
        # for every core. Make that call now so that the first sample means something.
        try:
            self._psutil.cpu_percent(percpu=True)
        except Exception:
            pass

    def sample(self) -> dict[str, Section]:
        """``{"cpu": .., "mem": .., "disk": .., "net": ..}``; see ``StatsCollector.node_latest``."""
        return {
            samples.NODE_CPU: self._section(self._cpu),
            samples.NODE_MEM: self._section(self._mem),
            samples.NODE_DISK: self._section(self._disk, path=self.scratch_root),
            samples.NODE_NET: self._section(self._net),
        }

    @staticmethod
    def _section(read: Callable[[], Section], **always: Any) -> Section:
        try:
            return {**always, **read()}
        except Exception as error:
            return {**always, samples.SAMPLE_ERROR: f"{type(error).__name__}: {error}"}

    def _cpu(self) -> Section:
        per_core = [float(p) for p in self._psutil.cpu_percent(percpu=True)]
        count = self._psutil.cpu_count() or len(per_core)
        percent = sum(per_core) / len(per_core) if per_core else 0.0
        return {"count": int(count), "percent": round(percent, 1), "per_core": per_core}

    def _mem(self) -> Section:
        memory = self._psutil.virtual_memory()
        return {"total": int(memory.total), "used": int(memory.used), "available": int(memory.available)}

    def _disk(self) -> Section:
        usage = self._psutil.disk_usage(self.scratch_root)
        return {"total": int(usage.total), "used": int(usage.used), "free": int(usage.free)}

    def _net(self) -> Section:
        # Loopback is traffic of the machine with itself (the agent's own AMP, etcd, ...);
        # kernels' counters leave it out too.
        rx = tx = 0
        for name, counters in self._psutil.net_io_counters(pernic=True).items():
            if name == "lo":
                continue
            rx += int(counters.bytes_recv)
            tx += int(counters.bytes_sent)
        return {"rx_bytes": rx, "tx_bytes": tx}
