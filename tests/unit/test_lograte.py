"""LogRate: at most a burst of lines per kind and period, then one summary (on task.Clock)."""

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs

from bai_agent.runtime.lograte import LogRate


@pytest.fixture
def clock():
    return Clock()


def lines(events):
    return [
        (event["log_level"], event["log_format"], {k: event[k] for k in ("count", "kind") if k in event})
        for event in events
    ]


def test_a_burst_goes_through_and_the_rest_is_summarised_when_the_period_ends(clock):
    rate = LogRate(clock, Logger(), burst=3, period=10.0)
    with capturedLogs() as events:
        results = [
            rate.emit("failed authentication", LogLevel.warn, "manager {peer} failed", peer=n) for n in range(10)
        ]
        assert results == [True] * 3 + [False] * 7
        assert [event["peer"] for event in events] == [0, 1, 2]
        assert rate.suppressed("failed authentication") == 7
        clock.advance(9.9)
        assert len(events) == 3
        clock.advance(0.1)
        assert lines(events[3:]) == [
            (
                LogLevel.warn,
                "{count} more {kind} lines suppressed in the last {period:g} s",
                {"count": 7, "kind": "failed authentication"},
            )
        ]
    assert clock.getDelayedCalls() == []


def test_a_new_period_lets_a_new_burst_through(clock):
    rate = LogRate(clock, Logger(), burst=2, period=10.0)
    with capturedLogs() as events:
        for _ in range(5):
            rate.emit("bad bytes", LogLevel.info, "closing")
        clock.advance(10.0)
        for _ in range(2):
            assert rate.emit("bad bytes", LogLevel.info, "closing")
    assert [event["log_format"] for event in events].count("closing") == 4
    assert sum(1 for event in events if "suppressed" in event["log_format"]) == 1


def test_kinds_are_counted_apart(clock):
    rate = LogRate(clock, Logger(), burst=1, period=10.0)
    assert rate.emit("a", LogLevel.info, "a")
    assert rate.emit("b", LogLevel.info, "b")
    assert not rate.emit("a", LogLevel.info, "a")
    assert rate.suppressed("a") == 1 and rate.suppressed("b") == 0


def test_a_quiet_period_needs_no_summary_and_no_timer(clock):
    rate = LogRate(clock, Logger(), burst=5, period=10.0)
    with capturedLogs() as events:
        for _ in range(5):
            rate.emit("silent connection", LogLevel.info, "dropping")
        clock.advance(60)
    assert len(events) == 5
    assert clock.getDelayedCalls() == []


def test_stop_says_what_is_suppressed_and_cancels_the_timers(clock):
    rate = LogRate(clock, Logger(), burst=1, period=10.0)
    with capturedLogs() as events:
        rate.emit("k", LogLevel.warn, "x")
        rate.emit("k", LogLevel.warn, "x")
        rate.stop()
    assert events[-1]["count"] == 1
    assert clock.getDelayedCalls() == []


def test_nonsense_rates_are_refused(clock):
    for burst, period in ((0, 10.0), (1, 0.0)):
        with pytest.raises(ValueError):
            LogRate(clock, Logger(), burst=burst, period=period)
