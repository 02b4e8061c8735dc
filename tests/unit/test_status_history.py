"""
The last hour of statistics (``bai_agent.status.history``): bounded rings, one round at a
time, kernels forgotten when they end, and the charts the page draws from them.
"""

import json
import re

import pytest
from twisted.internet.task import Clock

from bai_agent.stats.collector import StatsCollector
from bai_agent.status.assets import CHART_HEIGHT, CHART_WIDTH
from bai_agent.status.history import Ring, StatsHistory
from bai_agent.status.page import chart_segments, render_history
from tests.unit.test_rpc_server import Harness
from tests.unit.test_stats_collector import A, Machine, run_now
from tests.unit.test_status_metrics import GIB, NOW, BusyAgent


def node(at, cpu=50.0, mem=4 * GIB, disk=10 * GIB):
    return {
        "sampled_at": at,
        "cpu": {"count": 4, "percent": cpu, "per_core": []},
        "mem": {"total": 16 * GIB, "used": mem, "available": 16 * GIB - mem if mem is not None else None},
        "disk": {"path": "/scratch", "total": 100 * GIB, "used": disk, "free": None},
        "net": {"rx_bytes": None, "tx_bytes": None},
        "gpus": [],
    }


def kernel(at, cpu_util=100.0, mem=GIB):
    return {"sampled_at": at, "cpu_util": cpu_util, "mem_bytes": mem}


def test_a_ring_keeps_the_last_values_oldest_first():
    ring = Ring(3)
    assert ring.values() == [] and ring.last() is None
    for value in range(1, 6):
        ring.append(float(value))
    assert ring.values() == [3.0, 4.0, 5.0]
    assert len(ring) == 3 and ring.capacity == 3 and ring.last() == 5.0
    with pytest.raises(ValueError):
        Ring(0)


def test_an_hour_at_five_seconds_is_721_readings_of_the_node_and_121_of_a_kernel():
    history = StatsHistory(5.0)
    assert history.points == 721
    assert history.node.times.capacity == 721
    history.record(None, {"k1": kernel(NOW)})
    assert history.kernels["k1"].times.capacity == 121
    with pytest.raises(ValueError):
        StatsHistory(0)


def test_rounds_add_node_and_kernel_readings():
    history = StatsHistory(5.0, kernel_step=5.0)
    for step in range(3):
        at = NOW + 5 * step
        history.record(node(at, cpu=10.0 * step), {"k1": kernel(at, cpu_util=150.0, mem=(step + 1) * GIB)})
    shown = history.to_json(NOW + 10)
    assert shown["span"] == 3600.0 and shown["interval"] == 5.0 and shown["untracked_kernels"] == 0
    assert shown["kernel_step"] == 5.0
    assert shown["node"]["times"] == [NOW, NOW + 5, NOW + 10]
    assert shown["node"]["cpu"] == [0, 10, 20]
    assert shown["node"]["mem"] == [4 * GIB] * 3
    assert shown["node"]["mem_total"] == 16 * GIB and shown["node"]["disk_total"] == 100 * GIB
    assert shown["kernels"]["k1"] == {
        "times": [NOW, NOW + 5, NOW + 10],
        "cpu": [1.5] * 3,
        "mem": [GIB, 2 * GIB, 3 * GIB],
    }
    json.dumps(shown, allow_nan=False)


def test_a_kernels_point_holds_the_most_of_its_thirty_seconds():
    history = StatsHistory(5.0)
    for step in range(12):  # a minute of rounds
        at = NOW + 5 * step
        history.record(None, {"k1": kernel(at, cpu_util=10.0 * step, mem=None if step == 0 else (12 - step) * GIB)})
    shown = history.to_json(NOW + 55)["kernels"]["k1"]
    assert shown == {"times": [NOW + 25, NOW + 55], "cpu": [0.5, 1.1], "mem": [11 * GIB, 6 * GIB]}


def test_a_reading_no_newer_than_the_last_adds_nothing():
    history = StatsHistory(5.0)
    history.record(node(NOW), {"k1": kernel(NOW)})
    history.record(node(NOW), {"k1": kernel(NOW)})  # the node was not sampled again; the kernel failed
    history.record(None, {"k1": kernel(NOW - 1)})
    shown = history.to_json(NOW)
    assert shown["node"]["times"] == [NOW]
    assert shown["kernels"]["k1"]["times"] == [NOW]


def test_missing_readings_are_null():
    history = StatsHistory(5.0)
    history.record(node(NOW, cpu=None, mem=None), {"k1": {"sampled_at": NOW}})
    shown = history.to_json(NOW)
    assert shown["node"]["cpu"] == [None] and shown["node"]["mem"] == [None]
    assert shown["kernels"]["k1"]["cpu"] == [None] and shown["kernels"]["k1"]["mem"] == [None]


def test_an_ended_kernel_loses_its_history():
    history = StatsHistory(5.0)
    history.record(None, {"k1": kernel(NOW), "k2": kernel(NOW)})
    history.record(None, {"k2": kernel(NOW + 5)})
    assert set(history.kernels) == {"k2"}
    assert set(history.to_json(NOW + 5)["kernels"]) == {"k2"}


def test_only_the_last_span_is_shown_and_memory_stays_bounded():
    history = StatsHistory(5.0, span=60.0, max_kernels=2)
    for step in range(1000):
        at = NOW + 5 * step
        history.record(node(at), {f"k{index}": kernel(at) for index in range(5)})
    assert history.points == 13 and history.kernel_points == 3
    for series, points in ((history.node, 13), *((series, 3) for series in history.kernels.values())):
        assert len(series.times) == points and all(len(ring) == points for ring in series.values.values())
    assert len(history.kernels) == 2
    now = NOW + 5 * 999
    shown = history.to_json(now)
    assert shown["untracked_kernels"] == 3
    assert shown["node"]["times"][0] == now - 60 and shown["node"]["times"][-1] == now
    assert len(shown["node"]["cpu"]) == 13
    # Later, nothing newer: the old readings drop out of the window.
    assert history.to_json(now + 3600)["node"]["times"] == []


def test_history_follows_the_collectors_rounds(tmp_path):
    machine = Machine(tmp_path)
    clock = Clock()
    clock.advance(1000)
    collector = StatsCollector(clock, machine.reader, lambda: list(machine.targets), run_now)
    history = StatsHistory(collector.interval)
    collector.add_round_listener(lambda: history.record_from(collector))
    collector.startService()
    machine.set(A, usage_usec=1_000_000 + 10_000_000)  # two cores busy for 5 s
    clock.advance(5)
    shown = history.to_json(clock.seconds())
    # Both rounds in one point of 30 s: the later time, the most CPU.
    assert shown["kernels"]["ka"]["times"] == [1005.0]
    assert shown["kernels"]["ka"]["cpu"] == [2]
    assert shown["node"]["times"] == []  # this collector samples no node
    machine.targets.pop(0)
    collector.forget("ka")
    clock.advance(5)
    assert set(history.to_json(clock.seconds())["kernels"]) == {"kb"}
    collector.stopService()


# -- the charts --------------------------------------------------------------------------------


def test_chart_points_span_the_view_box():
    segments = chart_segments([0.0, 30.0, 60.0], [0.0, 5.0, 10.0], 0.0, 60.0, 10.0)
    assert segments == [[(0, CHART_HEIGHT), (CHART_WIDTH // 2, CHART_HEIGHT // 2), (CHART_WIDTH, 0)]]
    # Above the top is drawn at the top; a missing reading breaks the line.
    assert chart_segments([0.0, 30.0, 60.0], [20.0, None, -1.0], 0.0, 60.0, 10.0) == [
        [(0, 0)],
        [(CHART_WIDTH, CHART_HEIGHT)],
    ]


def paths(markup):
    return re.findall(r'<path class="(area|line)" d="([^"]*)"></path>', markup)


def test_the_page_draws_a_chart_per_series_with_the_current_value_and_the_peak(tmp_path):
    history = StatsHistory(5.0)
    for step in range(10):
        at = NOW - 45 + 5 * step
        history.record(node(at, cpu=10.0 * step), {"k-train": kernel(at, cpu_util=100.0 + step * 10, mem=GIB)})
    busy = BusyAgent(tmp_path, history=history)
    try:
        snap = busy.state.status_page().snapshot()
    finally:
        busy.close()
    assert snap["history"]["node"]["cpu"][-1] == 90
    markup = render_history(snap)
    assert markup.count('<svg class="spark"') == 5  # CPU, memory, disk; a kernel's CPU and memory
    assert (
        '<span class="chart-label">CPU</span> <span class="now">90%</span> <span class="meta">peak 90%</span>' in markup
    )
    assert '<span class="now">1.9</span> <span class="meta">peak 1.9 of 2</span>' in markup
    assert "<code>k-train</code>" in markup and "<code>k-idle</code>" not in markup
    line = [d for kind, d in paths(markup) if kind == "line"][0]
    points = [tuple(map(int, point.split(","))) for point in line[1:].split("L")]
    assert len(points) == 10
    assert points[-1] == (CHART_WIDTH, CHART_HEIGHT - round(0.9 * CHART_HEIGHT))


def test_one_reading_is_drawn_as_a_dot(tmp_path):
    history = StatsHistory(5.0)
    history.record(node(NOW), {})
    busy = BusyAgent(tmp_path, history=history)
    try:
        markup = render_history(busy.state.status_page().snapshot())
    finally:
        busy.close()
    x, y = CHART_WIDTH, CHART_HEIGHT - round(0.5 * CHART_HEIGHT)
    assert ("line", f"M{x},{y}L{x},{y}") in paths(markup)


def test_no_history_yet_is_said(tmp_path):
    agent = Harness(tmp_path)
    markup = render_history(agent.state.status_page().snapshot())
    assert "no kernel history yet" in markup
    assert '<span class="now">-</span> <span class="meta">peak -</span>' in markup
    assert [d for _, d in paths(markup)] == [""] * 6


def test_ties_round_up_as_the_script_rounds_them():
    # JavaScript's toFixed rounds a tie up, Python's format to even: the page rounds first.
    from bai_agent.status.page import _bytes, _cores

    assert _bytes(1.25 * GIB) == "1.3 GiB"
    assert _bytes(10.5 * GIB) == "11 GiB"
    assert _cores(0.125) == "0.13"
    assert _cores(2.0) == "2"
