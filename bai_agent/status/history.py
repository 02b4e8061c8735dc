"""
The last hour of the statistics the agent samples, for the status page's charts: the node's
CPU use, memory and scratch disk, and each kernel's CPU and memory.

``StatsHistory.record`` takes one round's checked readings (``bai_agent.stats.readings``)
after each round of the statistics collector; ``to_json`` is what ``/status.json`` carries
and the page draws. Everything is in memory and bounded by count, whatever happens: each
series is a ring of numbers in a preallocated ``array``, 8 bytes a number. The node's
series keep every round of the hour (721 at the 5 s sampling interval); a kernel's keep a
point per ``kernel_step`` (30 s: 121 points), the most of the rounds in it, so that a
node with many kernels neither holds nor sends nor draws 721 points for each (the page is
drawn on the reactor thread). At most ``max_kernels`` kernels have a history (the ones past
it are counted, not kept), and a kernel's history goes when the collector forgets the
kernel (it ended). At the defaults that is at most 121 x 3 x 8 bytes a kernel, 750 KB for
256 kernels.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bai_agent.protocol import samples
from bai_agent.stats import readings

if TYPE_CHECKING:
    from bai_agent.stats.collector import StatsCollector

DEFAULT_SPAN = 3600.0
DEFAULT_KERNEL_STEP = 30.0
DEFAULT_MAX_KERNELS = 256

#: The node's series and the kernels': names in ``to_json``.
NODE_SERIES = ("cpu", "mem", "disk")
KERNEL_SERIES = ("cpu", "mem")


class Ring:
    """The last ``capacity`` floats appended, oldest first; NaN stands for "no reading"."""

    __slots__ = ("_values", "_next", "_count")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a ring holds at least one value, not {capacity!r}")
        self._values = array("d", bytes(8 * capacity))
        self._next = 0
        self._count = 0

    @property
    def capacity(self) -> int:
        return len(self._values)

    def __len__(self) -> int:
        return self._count

    def append(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)
        self._count = min(self._count + 1, len(self._values))

    def last(self) -> float | None:
        return self._values[self._next - 1] if self._count else None

    def replace_last(self, value: float) -> None:
        if not self._count:
            raise IndexError("an empty ring has no last value")
        self._values[self._next - 1] = value

    def values(self) -> list[float]:
        if self._count < len(self._values):
            return self._values[: self._count].tolist()
        return self._values[self._next :].tolist() + self._values[: self._next].tolist()


class Series:
    """
    Readings on one time axis: a ring of times and one ring per named value. With a
    ``step``, a reading less than ``step`` seconds after the first of the last point is
    folded into that point (the largest of each value, at the later time) instead of
    making a new one.
    """

    __slots__ = ("times", "values", "step", "_point_start")

    def __init__(self, capacity: int, names: Iterable[str], step: float = 0.0) -> None:
        self.times = Ring(capacity)
        self.values = {name: Ring(capacity) for name in names}
        self.step = step
        self._point_start = -math.inf

    def add(self, at: float, readings: Mapping[str, float | None]) -> bool:
        """Add the readings taken ``at``; False (nothing added) unless ``at`` is later than the last."""
        last = self.times.last()
        if last is not None and not at > last:
            return False
        if at - self._point_start < self.step:
            self.times.replace_last(at)
            for name, ring in self.values.items():
                value = readings.get(name)
                if value is not None:
                    before = ring.last()
                    ring.replace_last(float(value) if before is None or math.isnan(before) else max(before, value))
            return True
        self._point_start = at
        self.times.append(at)
        for name, ring in self.values.items():
            value = readings.get(name)
            ring.append(math.nan if value is None else float(value))
        return True

    def to_json(self, since: float) -> dict[str, list[float | None]]:
        """``{"times": [...], name: [...]}`` of the readings taken at ``since`` or later; None: no reading."""
        times = self.times.values()
        first = bisect.bisect_left(times, since)
        shown: dict[str, list[float | None]] = {"times": [_number(round(at, 1)) for at in times[first:]]}
        for name, ring in self.values.items():
            shown[name] = [_number(value) for value in ring.values()[first:]]
        return shown


def _number(value: float) -> float | None:
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2**53 else round(value, 3)


class StatsHistory:
    """
    :param interval: seconds between the collector's rounds; with ``span``, how many
        readings a series keeps.
    :param span: seconds of history shown (one hour).
    :param kernel_step: seconds a point of a kernel's series stands for (at least ``interval``).
    :param max_kernels: most kernels with a history at once.
    """

    def __init__(
        self,
        interval: float,
        span: float = DEFAULT_SPAN,
        kernel_step: float = DEFAULT_KERNEL_STEP,
        max_kernels: int = DEFAULT_MAX_KERNELS,
    ) -> None:
        if not (interval > 0 and span >= interval):
            raise ValueError(f"need 0 < interval <= span, not interval={interval!r}, span={span!r}")
        self.interval = float(interval)
        self.span = float(span)
        self.points = math.ceil(self.span / self.interval) + 1
        self.kernel_step = max(float(kernel_step), self.interval)
        self.kernel_points = math.ceil(self.span / self.kernel_step) + 1
        self.max_kernels = max_kernels
        self.node = Series(self.points, NODE_SERIES)
        self.mem_total: float | None = None
        self.disk_total: float | None = None
        self.kernels: dict[str, Series] = {}
        #: Kernels sampled in the last round that have no history (past ``max_kernels``).
        self.untracked_kernels = 0

    def record_from(self, stats: StatsCollector) -> None:
        """``record`` the collector's last round (call it after each round)."""
        self.record(readings.node_sample(stats), readings.kernel_samples(stats))

    def record(self, node: Mapping[str, Any] | None, kernels: Mapping[str, Mapping[str, float]]) -> None:
        """
        One round: ``node`` as ``readings.node_sample`` gives it (or None), ``kernels`` as
        ``readings.kernel_samples`` (every kernel the collector still keeps). A reading that
        is no newer than the last one kept (the node not sampled again, a kernel whose
        reading failed) adds nothing; a kernel missing from ``kernels`` has ended, and its
        history goes.
        """
        if node is not None and node.get("sampled_at") is not None:
            self.node.add(
                node["sampled_at"],
                {"cpu": node["cpu"]["percent"], "mem": node["mem"]["used"], "disk": node["disk"]["used"]},
            )
            self.mem_total = node["mem"]["total"]
            self.disk_total = node["disk"]["total"]
        for kernel_id in [kernel_id for kernel_id in self.kernels if kernel_id not in kernels]:
            del self.kernels[kernel_id]
        untracked = 0
        for kernel_id, sample in kernels.items():
            series = self.kernels.get(kernel_id)
            if series is None:
                if len(self.kernels) >= self.max_kernels:
                    untracked += 1
                    continue
                # Rounds come every interval, a few ms early or late: a point holds the
                # rounds of kernel_step seconds, give or take half an interval.
                step = self.kernel_step - self.interval / 2 if self.kernel_step > self.interval else 0.0
                series = self.kernels[kernel_id] = Series(self.kernel_points, KERNEL_SERIES, step)
            at = sample.get(samples.SAMPLED_AT)
            if at is None:
                continue
            util = sample.get(samples.CPU_UTIL)
            series.add(at, {"cpu": None if util is None else util / 100, "mem": sample.get(samples.MEM_BYTES)})
        self.untracked_kernels = untracked

    def to_json(self, now: float) -> dict[str, Any]:
        """
        The readings of the last ``span`` seconds before ``now``::

            {"span": 3600.0, "interval": 5.0, "kernel_step": 30.0, "untracked_kernels": 0,
             "node": {"times": [...], "cpu": [percent], "mem": [bytes used], "disk": [bytes used],
                      "mem_total": bytes, "disk_total": bytes},
             "kernels": {kernel_id: {"times": [...], "cpu": [cores], "mem": [bytes]}}}
        """
        since = now - self.span
        node: dict[str, Any] = self.node.to_json(since)
        node["mem_total"] = self.mem_total
        node["disk_total"] = self.disk_total
        return {
            "span": self.span,
            "interval": self.interval,
            "kernel_step": self.kernel_step,
            "untracked_kernels": self.untracked_kernels,
            "node": node,
            "kernels": {kernel_id: series.to_json(since) for kernel_id, series in sorted(self.kernels.items())},
        }
