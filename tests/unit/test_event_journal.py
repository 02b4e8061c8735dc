"""The event journal: seq numbering, persistence, crash repair, replay, compaction."""

import itertools
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from bai_agent.kernels.journal import (
    EVENT_TYPES,
    TERMINATION_REASONS,
    AgentEvent,
    EventJournal,
)
from bai_agent.protocol.errors import EventsExpired, InvalidRequest


def warnings(events):
    return [e for e in events if e["log_level"] >= LogLevel.warn]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state" / "events.jsonl")


def open_journal(path, clock, keep=10000, fsync=False):
    journal = EventJournal(path, clock, keep=keep, fsync=fsync)
    journal.open()
    return journal


def seqs(events):
    return [e.seq for e in events]


def file_lines(path):
    with open(path, "rb") as f:
        return f.read().splitlines()


def append_n(journal, count, kernel_id="k1"):
    return [journal.append("kernel-started", kernel_id, {"n": i}) for i in range(count)]


# -- values ------------------------------------------------------------------------------


def test_event_types_are_the_protocol_ones():
    assert EVENT_TYPES == {
        "agent-started",
        "agent-stopping",
        "kernel-creating",
        "kernel-started",
        "kernel-restarted",
        "kernel-terminated",
        "service-started",
        "service-stopped",
        "image-pulling",
        "image-pull-progress",
        "image-pulled",
        "image-pull-failed",
    }
    assert "oom-killed" in TERMINATION_REASONS
    # PROTOCOL.md's nine, plus agent-stopping (--destroy-kernels-on-stop).
    assert len(TERMINATION_REASONS) == 10 and "agent-stopping" in TERMINATION_REASONS


def test_event_round_trips_through_json():
    event = AgentEvent(seq=3, type="kernel-started", kernel_id="k", data={"a": [1, 2]}, ts=1.5)
    assert AgentEvent.from_json(event.to_json()) == event
    assert AgentEvent.from_json(json.dumps(event.to_json())) == event
    assert json.loads(json.dumps(event.to_json())) == event.to_json()


@pytest.mark.parametrize(
    "bad",
    [
        "[1]",
        {"seq": 1, "type": "x", "kernel_id": None, "data": {}},
        {"seq": 0, "type": "x", "kernel_id": None, "data": {}, "ts": 0},
        {"seq": True, "type": "x", "kernel_id": None, "data": {}, "ts": 0},
        {"seq": 1, "type": "x", "kernel_id": 5, "data": {}, "ts": 0},
        {"seq": 1, "type": "x", "kernel_id": None, "data": [], "ts": 0},
        {"seq": 1, "type": "x", "kernel_id": None, "data": {}, "ts": "now"},
        '{"seq": 1, "typ',
    ],
)
def test_event_from_json_rejects_what_is_not_an_event(bad):
    with pytest.raises(ValueError):
        AgentEvent.from_json(bad)


# -- appending ---------------------------------------------------------------------------


def test_seq_starts_at_one_and_grows(path, clock):
    journal = open_journal(path, clock)
    assert journal.last_seq == 0
    assert journal.since(0) == []
    first = journal.append("agent-started")
    clock.advance(2.5)
    second = journal.append("kernel-creating", "k1", {"image": "python"})
    assert (first.seq, second.seq) == (1, 2)
    assert (first.ts, second.ts) == (0.0, 2.5)
    assert second.kernel_id == "k1" and second.data == {"image": "python"}
    assert first.kernel_id is None and first.data == {}
    assert journal.last_seq == 2
    assert journal.since(0) == [first, second]


def test_append_writes_one_json_line_per_event(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 3)
    assert [AgentEvent.from_json(line) for line in file_lines(path)] == events


def test_append_fsyncs_each_event_by_default(path, clock, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    journal = open_journal(path, clock, fsync=True)
    before = len(synced)
    journal.append("agent-started")
    assert len(synced) == before + 1


def test_append_without_fsync_does_not_sync(path, clock, monkeypatch):
    journal = open_journal(path, clock, fsync=False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync called"))
    journal.append("agent-started")


def test_unknown_type_is_rejected_without_using_a_seq(path, clock):
    journal = open_journal(path, clock)
    with pytest.raises(ValueError):
        journal.append("kernel-exploded", "k1")
    assert journal.last_seq == 0
    assert journal.append("agent-started").seq == 1


def test_termination_needs_a_known_reason(path, clock):
    journal = open_journal(path, clock)
    with pytest.raises(ValueError):
        journal.append("kernel-terminated", "k1", {"reason": "bored"})
    with pytest.raises(ValueError):
        journal.append("kernel-terminated", "k1", {})
    event = journal.append("kernel-terminated", "k1", {"reason": "oom-killed", "exit_code": 137, "stats": {}})
    assert event.seq == 1


def test_data_that_is_not_json_is_rejected(path, clock):
    journal = open_journal(path, clock)
    with pytest.raises(ValueError):
        journal.append("kernel-started", "k1", {"when": object()})
    with pytest.raises(ValueError):
        journal.append("kernel-started", "k1", {"x": float("nan")})
    with pytest.raises(ValueError):
        journal.append("kernel-started", "k1", ["not", "a", "mapping"])
    assert journal.last_seq == 0
    assert os.path.getsize(path) == 0


def test_event_in_memory_equals_the_one_read_back(path, clock):
    journal = open_journal(path, clock)
    event = journal.append("kernel-started", "k1", {"pair": (1, 2), 3: "three"})
    assert event.data == {"pair": [1, 2], "3": "three"}
    journal.close()
    assert open_journal(path, clock).since(0) == [event]


def test_failed_write_leaves_no_partial_line_and_no_used_seq(path, clock, monkeypatch):
    journal = open_journal(path, clock, fsync=True)
    journal.append("agent-started")
    size = os.path.getsize(path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        journal.append("kernel-started", "k1")
    monkeypatch.undo()
    assert os.path.getsize(path) == size
    assert journal.last_seq == 1
    assert journal.append("kernel-started", "k1").seq == 2
    journal.close()
    assert seqs(open_journal(path, clock).since(0)) == [1, 2]


def test_append_before_open_is_an_error(path, clock):
    journal = EventJournal(path, clock)
    with pytest.raises(RuntimeError):
        journal.append("agent-started")


# -- listeners ---------------------------------------------------------------------------


def test_listener_hears_each_appended_event(path, clock):
    journal = open_journal(path, clock)
    heard = []
    journal.add_listener(heard.append)
    event = journal.append("agent-started")
    assert heard == [event]
    journal.remove_listener(heard.append)
    journal.append("agent-stopping")
    assert heard == [event]
    journal.remove_listener(heard.append)  # harmless twice


def test_listener_exception_is_logged_and_swallowed(path, clock):
    journal = open_journal(path, clock)
    heard = []

    def broken(event):
        raise RuntimeError("listener bug")

    journal.add_listener(broken)
    journal.add_listener(heard.append)
    with capturedLogs() as events:
        event = journal.append("agent-started")
    assert heard == [event]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert journal.last_seq == 1


# -- replay ------------------------------------------------------------------------------


def test_since_returns_later_events_in_order(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 5)
    assert journal.since(0) == events
    assert journal.since(2) == events[2:]
    assert journal.since(4) == events[4:]
    assert journal.since(5) == []
    assert journal.since(99) == []


def test_since_rejects_a_negative_seq(path, clock):
    journal = open_journal(path, clock)
    with pytest.raises(InvalidRequest):
        journal.since(-1)


def test_events_expired_when_asking_for_dropped_events(path, clock):
    journal = open_journal(path, clock, keep=10)
    events = append_n(journal, 25)
    assert journal.since(0) == events[-10:]  # 0: from the oldest kept
    assert journal.since(15) == events[-10:]  # the oldest kept is 16
    assert journal.since(20) == events[-5:]
    with pytest.raises(EventsExpired) as excinfo:
        journal.since(14)
    assert excinfo.value.code == b"EVENTS_EXPIRED"
    with pytest.raises(EventsExpired):
        journal.since(1)


# -- persistence -------------------------------------------------------------------------


def test_events_and_seq_survive_close_and_reopen(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 3)
    journal.close()
    journal.close()  # harmless twice

    reopened = open_journal(path, clock)
    assert reopened.last_seq == 3
    assert reopened.since(0) == events
    assert reopened.since(1) == events[1:]
    assert reopened.append("agent-started").seq == 4


def test_reopen_without_close_continues_seq(path, clock):
    """A killed agent never calls close(); the file alone is enough."""
    journal = open_journal(path, clock)
    append_n(journal, 3)
    os.remove(path + ".seq")
    reopened = open_journal(path, clock)
    assert reopened.append("agent-started").seq == 4


def test_torn_last_line_is_skipped_and_cut_off(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 3)
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"seq":4,"type":"kernel-sta')  # killed mid-write

    with capturedLogs() as logged:
        reopened = open_journal(path, clock)
    assert warnings(logged)
    assert reopened.since(0) == events
    assert reopened.last_seq == 3
    fourth = reopened.append("kernel-started", "k2")
    assert fourth.seq == 4
    reopened.close()
    assert [AgentEvent.from_json(line) for line in file_lines(path)] == events + [fourth]


def test_last_line_without_its_newline_is_kept(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 2)
    journal.close()
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 1)

    reopened = open_journal(path, clock)
    assert reopened.since(0) == events
    third = reopened.append("agent-stopping")
    assert third.seq == 3
    assert [AgentEvent.from_json(line) for line in file_lines(path)] == events + [third]


def test_garbage_line_in_the_middle_is_skipped(path, clock):
    journal = open_journal(path, clock)
    events = append_n(journal, 4)
    journal.close()
    lines = file_lines(path)
    lines.insert(2, b"\x00\xff not json at all")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")

    with capturedLogs() as logged:
        reopened = open_journal(path, clock)
    assert [e["line_number"] for e in warnings(logged)] == [3]
    assert reopened.since(0) == events
    assert reopened.append("agent-started").seq == 5
    reopened.close()
    # The file was rewritten without the garbage.
    assert seqs(AgentEvent.from_json(line) for line in file_lines(path)) == [1, 2, 3, 4, 5]


def test_damaged_event_makes_older_events_expire(path, clock):
    """Replaying across a lost event would drop it silently; EVENTS_EXPIRED instead."""
    journal = open_journal(path, clock)
    events = append_n(journal, 5)
    journal.close()
    lines = file_lines(path)
    lines[2] = lines[2][:10] + b"#" + lines[2][11:]  # event 3 is damaged
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")

    reopened = open_journal(path, clock)
    assert reopened.since(0) == events[3:]
    assert reopened.since(3) == events[3:]
    with pytest.raises(EventsExpired):
        reopened.since(1)
    assert reopened.append("agent-started").seq == 6


def test_missing_file_starts_at_seq_zero(path, clock):
    journal = open_journal(path, clock)
    assert journal.last_seq == 0
    assert os.path.exists(path)


# -- compaction --------------------------------------------------------------------------


def test_file_is_compacted_to_the_last_keep_events(path, clock):
    keep = 5
    journal = open_journal(path, clock, keep=keep)
    events = append_n(journal, 2 * keep)
    assert len(file_lines(path)) == 2 * keep
    events += append_n(journal, 1)  # one more than 2 x keep lines: compact
    assert seqs(AgentEvent.from_json(line) for line in file_lines(path)) == seqs(events[-keep:])
    events += append_n(journal, 3)
    assert seqs(AgentEvent.from_json(line) for line in file_lines(path)) == list(range(7, 15))
    assert journal.since(0) == events[-keep:]
    assert not os.path.exists(path + ".tmp")
    journal.close()

    reopened = open_journal(path, clock, keep=keep)
    assert reopened.since(0) == events[-keep:]
    assert reopened.append("agent-started").seq == 15


def test_failed_compaction_does_not_fail_the_append(path, clock, monkeypatch):
    journal = open_journal(path, clock, keep=2)
    append_n(journal, 4)

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with capturedLogs() as logged:
        event = journal.append("agent-started")
    assert event.seq == 5
    assert [e for e in logged if "log_failure" in e]
    monkeypatch.undo()
    journal.close()
    assert seqs(open_journal(path, clock, keep=2).since(0)) == [4, 5]


def test_memory_holds_at_most_keep_events(path, clock):
    journal = open_journal(path, clock, keep=3)
    append_n(journal, 10)
    assert len(journal) == 3
    assert len(file_lines(path)) <= 6


def test_reopen_with_a_smaller_keep_compacts(path, clock):
    journal = open_journal(path, clock, keep=10)
    events = append_n(journal, 10)
    journal.close()
    reopened = open_journal(path, clock, keep=3)
    assert reopened.since(0) == events[-3:]
    assert len(file_lines(path)) == 3  # 10 lines are more than 2 x 3
    assert reopened.append("agent-started").seq == 11


# -- seq across a lost journal file ------------------------------------------------------


def test_deleted_journal_does_not_reuse_seqs(path, clock):
    journal = open_journal(path, clock)
    append_n(journal, 7)
    journal.close()
    with open(path + ".seq", "rb") as f:
        assert f.read().strip() == b"7"
    os.remove(path)

    reopened = open_journal(path, clock)
    assert reopened.last_seq == 7
    assert reopened.since(0) == []
    assert reopened.since(7) == []
    with pytest.raises(EventsExpired):
        reopened.since(3)  # events 4 to 7 are gone
    assert reopened.append("agent-started").seq == 8


def test_side_file_ahead_of_journal_wins(path, clock):
    """A journal file restored from an old copy: its seqs are behind the side file's."""
    journal = open_journal(path, clock)
    old = append_n(journal, 3)
    journal.close()
    with open(path, "rb") as f:
        old_copy = f.read()
    journal = open_journal(path, clock)
    append_n(journal, 4)
    journal.close()
    with open(path, "wb") as f:
        f.write(old_copy)

    reopened = open_journal(path, clock)
    assert reopened.last_seq == 7
    assert old[0] not in reopened.since(0)
    assert reopened.append("agent-started").seq == 8


def test_damaged_side_file_is_ignored(path, clock):
    journal = open_journal(path, clock)
    append_n(journal, 2)
    journal.close()
    with open(path + ".seq", "wb") as f:
        f.write(b"garbage")
    with capturedLogs() as logged:
        reopened = open_journal(path, clock)
    assert warnings(logged)
    assert reopened.append("agent-started").seq == 3


def test_compaction_writes_the_side_file(path, clock):
    journal = open_journal(path, clock, keep=2)
    append_n(journal, 5)  # compacted at the fifth
    with open(path + ".seq", "rb") as f:
        assert int(f.read()) >= 4


# -- property: any history keeps seqs growing and replays exactly the kept events -------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(min_value=1, max_value=7)),
        st.tuples(st.just("reopen"), st.booleans()),  # with or without close()
        st.tuples(st.just("tear"), st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b)),
        st.tuples(st.just("lose-file"), st.none()),
    ),
    max_size=25,
)

_examples = itertools.count()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keep=st.integers(min_value=1, max_value=6),
    ops=operations,
    probes=st.lists(st.integers(0, 80), max_size=8),
)
def test_any_history_keeps_seqs_growing_and_replays_the_kept_events(tmp_path, keep, ops, probes):
    path = str(tmp_path / f"example-{next(_examples)}" / "events.jsonl")
    clock = Clock()
    journal = open_journal(path, clock, keep=keep)
    handed_out = []  # every seq ever returned by append
    kept = []  # the model: events since() can serve, consecutive, newest last

    for op, arg in ops:
        if op == "append":
            for _ in range(arg):
                clock.advance(1)
                event = journal.append("kernel-started", "k", {"i": len(handed_out)})
                assert not handed_out or event.seq > handed_out[-1]
                handed_out.append(event.seq)
                kept = (kept + [event])[-keep:]
        elif op == "reopen":
            journal.close()
            if not arg and kept:
                # As if killed before close() wrote the side file: the journal file alone
                # must carry the seq (without kept events only the side file can).
                os.remove(path + ".seq")
            journal = open_journal(path, clock, keep=keep)
        elif op == "tear":
            journal.close()
            with open(path, "ab") as f:
                f.write(arg)
            journal = open_journal(path, clock, keep=keep)
        elif op == "lose-file":
            journal.close()
            os.remove(path)
            journal = open_journal(path, clock, keep=keep)
            kept = []
        assert journal.since(0) == kept
        last = handed_out[-1] if handed_out else 0
        assert journal.last_seq == last
        assert seqs(kept) == list(range(last - len(kept) + 1, last + 1))

        for x in probes:
            oldest = kept[0].seq if kept else last + 1
            if x != 0 and x < oldest - 1:
                with pytest.raises(EventsExpired):
                    journal.since(x)
            else:
                assert journal.since(x) == [e for e in kept if e.seq > x]

    assert handed_out == sorted(set(handed_out))
    journal.close()
