"""
Pushing journal events to a subscribed manager (PROTOCOL.md section 3).

A ``Subscribe(since)`` starts an ``EventFeed`` on that connection: it sends every event
after ``since`` in ``seq`` order as ``Event`` commands, up to ``WINDOW`` unacknowledged
at once, then follows the journal live. The feed keeps only a cursor (the next seq to
send), never a queue, so a manager that reads slowly costs no memory; if it falls so far
behind that the journal dropped what it still needs, the connection is closed and its
next ``Subscribe`` answers ``EVENTS_EXPIRED``. Events are sent at least once: a manager
that reconnects subscribes again with the last seq it acknowledged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.protocol import commands
from bai_agent.protocol.errors import EventsExpired

if TYPE_CHECKING:
    from bai_agent.kernels.journal import AgentEvent, EventJournal

WINDOW = 64


class Subscriber(Protocol):
    """The connection a feed sends on (an ``AgentAMP``)."""

    @property
    def transport(self) -> ITransport | None: ...

    def callRemote(self, commandType: type[commands.Event], **arguments: Any) -> Deferred[Any]: ...


class EventFeed:
    log = Logger()

    def __init__(self, journal: EventJournal, protocol: Subscriber, since: int, window: int = WINDOW) -> None:
        self.journal = journal
        self.protocol = protocol
        self.next_seq = since + 1
        self.acknowledged = since
        self.window = window
        self.outstanding = 0
        self.stopped = False

    def start(self) -> int:
        """Begin sending; raises ``EventsExpired`` when ``since`` is no longer kept."""
        self.journal.since(self.next_seq - 1)  # validates the cursor
        self.journal.add_listener(self._appended)
        return self.journal.last_seq

    def resume(self) -> None:
        """Send what is pending (called once the ``Subscribe`` answer has gone out)."""
        self._pump()

    @property
    def caught_up(self) -> bool:
        """Whether the manager acknowledged every event there is (or the feed ended)."""
        return self.stopped or self.acknowledged >= self.journal.last_seq

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.journal.remove_listener(self._appended)

    def _appended(self, event: AgentEvent) -> None:
        self._pump()

    def _pump(self) -> None:
        if self.stopped or self.outstanding >= self.window or self.next_seq > self.journal.last_seq:
            return
        try:
            pending = self.journal.since(self.next_seq - 1)
        except EventsExpired:
            self.log.warn("subscriber fell behind the journal; closing its connection")
            self.stop()
            if self.protocol.transport is not None:
                self.protocol.transport.loseConnection()
            return
        for event in pending[: self.window - self.outstanding]:
            self.next_seq = event.seq + 1
            self.outstanding += 1
            d = self.protocol.callRemote(
                commands.Event,
                seq=event.seq,
                type=event.type,
                kernel_id=event.kernel_id,
                data=event.data,
                ts=event.ts,
            )
            d.addCallbacks(self._acknowledged, self._failed, callbackArgs=(event.seq,))

    def _acknowledged(self, _: object, seq: int) -> None:
        self.outstanding -= 1
        self.acknowledged = max(self.acknowledged, seq)
        self._pump()

    def _failed(self, failure: Failure) -> None:
        # The connection is gone (or the manager refused the event): stop here; the
        # manager resubscribes from what it acknowledged.
        self.outstanding -= 1
        if not self.stopped:
            self.log.info("event delivery stopped: {error}", error=failure.getErrorMessage())
            self.stop()
            if self.protocol.transport is not None:
                self.protocol.transport.loseConnection()
