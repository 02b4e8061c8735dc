"""Event delivery to a subscribed manager: order, window, acknowledgement, replay."""

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from bai_agent.kernels.journal import EventJournal
from bai_agent.protocol import commands
from bai_agent.protocol.errors import EventsExpired
from bai_agent.rpc.events import EventFeed


class FakeTransport:
    def __init__(self):
        self.lost = False

    def loseConnection(self):
        self.lost = True


class FakeProtocol:
    """Records Event calls; the test decides when each is acknowledged."""

    def __init__(self):
        self.calls = []
        self.transport = FakeTransport()

    def callRemote(self, command, **kwargs):
        assert command is commands.Event
        d = Deferred()
        self.calls.append((kwargs, d))
        return d

    def ack_all(self):
        while any(not d.called for _, d in self.calls):
            for _, d in list(self.calls):
                if not d.called:
                    d.callback({})

    def seqs(self):
        return [kwargs["seq"] for kwargs, _ in self.calls]


@pytest.fixture
def journal(tmp_path):
    journal = EventJournal(str(tmp_path / "events.jsonl"), Clock(), keep=100, fsync=False)
    journal.open()
    return journal


def test_replays_after_since_in_order_then_follows_live(journal):
    for index in range(5):
        journal.append("kernel-creating", f"k{index}", {})
    protocol = FakeProtocol()
    feed = EventFeed(journal, protocol, since=2)
    assert feed.start() == 5
    assert protocol.seqs() == []  # nothing before the Subscribe answer
    feed.resume()
    assert protocol.seqs() == [3, 4, 5]
    journal.append("kernel-started", "k9", {})
    assert protocol.seqs() == [3, 4, 5, 6]
    kwargs = protocol.calls[-1][0]
    assert kwargs["type"] == "kernel-started" and kwargs["kernel_id"] == "k9"


def test_at_most_a_window_is_unacknowledged(journal):
    for _ in range(10):
        journal.append("agent-started", None, {})
    protocol = FakeProtocol()
    feed = EventFeed(journal, protocol, since=0, window=4)
    feed.start()
    feed.resume()
    assert protocol.seqs() == [1, 2, 3, 4]
    protocol.calls[0][1].callback({})
    assert protocol.seqs() == [1, 2, 3, 4, 5]
    protocol.ack_all()
    assert protocol.seqs() == list(range(1, 11))
    assert feed.acknowledged == 10


def test_since_older_than_kept_is_events_expired(tmp_path):
    journal = EventJournal(str(tmp_path / "events.jsonl"), Clock(), keep=3, fsync=False)
    journal.open()
    for _ in range(10):
        journal.append("agent-started", None, {})
    with pytest.raises(EventsExpired):
        EventFeed(journal, FakeProtocol(), since=1).start()


def test_a_failed_delivery_stops_the_feed_and_closes_the_connection(journal):
    journal.append("agent-started", None, {})
    protocol = FakeProtocol()
    feed = EventFeed(journal, protocol, since=0)
    feed.start()
    feed.resume()
    protocol.calls[0][1].errback(RuntimeError("connection lost"))
    assert feed.stopped and protocol.transport.lost
    journal.append("agent-started", None, {})
    assert protocol.seqs() == [1]  # no more sends after the failure


def test_a_subscriber_that_falls_behind_the_journal_is_disconnected(tmp_path):
    journal = EventJournal(str(tmp_path / "events.jsonl"), Clock(), keep=3, fsync=False)
    journal.open()
    protocol = FakeProtocol()
    feed = EventFeed(journal, protocol, since=0, window=1)
    feed.start()
    feed.resume()
    for _ in range(10):
        journal.append("agent-started", None, {})
    # Only seq 1 went out (window 1); by its acknowledgement 2 is no longer kept.
    protocol.calls[0][1].callback({})
    assert protocol.transport.lost and feed.stopped
