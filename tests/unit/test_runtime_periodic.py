"""PeriodicService: rounds on the clock that no exception ends, never overlapping."""

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from bai_agent.runtime.periodic import PeriodicService


def test_a_raising_round_is_logged_and_the_next_still_comes():
    clock = Clock()
    calls = []

    def work():
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("boom")

    service = PeriodicService(clock, 5.0, work, what="test work")
    service.startService()
    clock.advance(5)
    clock.advance(5)
    assert calls == [0, 5, 10]
    assert service.failures == 1


def test_a_failed_deferred_does_not_end_the_rounds():
    clock = Clock()
    calls = []

    def work():
        calls.append(clock.seconds())
        return fail(ValueError("no"))

    service = PeriodicService(clock, 1.0, work, what="test work")
    service.startService()
    clock.pump([1, 1, 1])
    assert calls == [0, 1, 2, 3]
    assert service.failures == 4


def test_rounds_never_overlap_and_stop_waits_for_the_round_in_flight():
    clock = Clock()
    pending = []

    def work():
        d = Deferred()
        pending.append(d)
        return d

    service = PeriodicService(clock, 1.0, work, what="test work", now=True)
    service.startService()
    clock.advance(3)
    assert len(pending) == 1  # the first round has not ended: no second one
    stopped = service.stopService()
    assert not stopped.called
    pending[0].callback(None)
    assert stopped.called
    clock.advance(10)
    assert len(pending) == 1  # the timer was cancelled


def test_stop_without_a_round_in_flight_fires_at_once():
    clock = Clock()
    service = PeriodicService(clock, 1.0, lambda: None, what="test work", now=False)
    service.startService()
    assert service.rounds == 0
    assert service.stopService().called


def test_run_now_waits_for_the_round_in_flight():
    clock = Clock()
    pending = []

    def work():
        d = Deferred()
        pending.append(d)
        return d

    service = PeriodicService(clock, 60.0, work, what="test work")
    service.startService()
    ended = []
    service.run_now().addCallback(ended.append)
    assert len(pending) == 1
    pending[0].callback(None)
    assert len(pending) == 2
    assert not ended
    pending[1].callback(None)
    assert ended == [None]
