"""The suite's own bookkeeping: a lost event, a gap or a leak must show in the figures."""

import pytest

from tests.faults.helpers import EventRecorder, Figures, Ledger

pytestmark = pytest.mark.faults


def event(seq, type="kernel-terminated", kernel_id="k", reason="user-requested"):
    return {"seq": seq, "type": type, "kernel_id": kernel_id, "data": {"reason": reason}, "ts": 0.0}


def recorder(since=0):
    r = EventRecorder(scenario=None, agent=None)
    r.first_since = since
    return r


def test_every_expected_event_received_without_gaps_is_no_loss():
    r = recorder(since=3)
    for seq in (4, 5, 6):
        r._on_event(event(seq, kernel_id=f"k{seq}"))
    r._on_event(event(5, kernel_id="k5"))  # at least once: a repeat is fine
    r.expect("kernel-terminated", "k5", {"user-requested"})
    figures = Figures()
    r.account(figures)
    assert (figures.events_expected, figures.events_received, figures.events_lost) == (1, 1, 0)
    assert r.last_acknowledged() == 6 and figures.problems() == []


def test_missing_events_gaps_and_conflicts_all_count_as_lost():
    r = recorder()
    r._on_event(event(1, kernel_id="a"))
    r._on_event(event(3, kernel_id="c"))
    r._on_event(event(3, kernel_id="other"))  # the same seq, another event
    r.expect("kernel-terminated", "b")
    r.expect("kernel-terminated", "a", {"self-terminated"})  # arrived, with another reason
    figures = Figures()
    r.account(figures)
    r.account(figures)  # counted once
    assert r.gaps() == [2] and len(r.conflicts) == 1
    assert r.last_acknowledged() == 1
    assert figures.events_lost == 2 + 1 + 1
    assert "events lost 4" in figures.problems()[0]


def test_held_events_are_not_acknowledged():
    r = recorder()
    r._on_event(event(1))
    r.hold()
    assert r._on_event(event(2)) is not None  # an answer that never comes
    assert r.last_acknowledged() == 1 and set(r.held) == {2}
    r.release()
    r._on_event(event(2))
    assert r.last_acknowledged() == 2


def test_the_summary_adds_up_every_test():
    ledger = Ledger()
    ledger.figures("a").kernels_expected = 2
    ledger.figures("a").kernels_survived = 2
    ledger.figures("b").kernels_expected = 1
    ledger.figures("b").containers_leaked = 1
    assert ledger.summary() == (
        "fault suite: kernels survived 2/3, events lost 0 (of 0 expected), containers leaked 1, scratch dirs leaked 0"
    )
    assert ledger.figures("b").problems() == ["kernels survived 0/1", "containers leaked 1"]
