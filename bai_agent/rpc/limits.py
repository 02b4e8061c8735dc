"""
What one manager connection may cost the agent (PROTOCOL.md section 6, "Limits"; DESIGN.md
"Security habits": nothing unauthenticated may cost more than a few KiB of memory, or
hold an fd for more than a few seconds).

**Boxes.** Twisted's AMP parser (``BinaryBoxProtocol``) keeps every key and value of the
box it is reading until the empty key that ends it, and the bytes of a string not yet
complete. It bounds each string (keys of 255 bytes, values of 65,535) but neither the box
nor its number of keys, so one connection that never ends a box makes the agent buffer
whatever it sends. ``BoundedBoxReceiver`` counts the wire bytes of the unfinished box as
the parser takes them, and feeds the parser no more than the room left, so that the
unfinished box plus the bytes not yet parsed never exceed the connection's ``BoxLimit``;
the byte that would is never buffered: the connection is closed instead.

- ``UNAUTHENTICATED``: 4 KiB and 8 keys. ``Hello`` is two keys, ``Authenticate`` three
  (its MAC is 64 hex digits); any other command still answers ``NOT_AUTHENTICATED``,
  within the same bound.
- ``AUTHENTICATED``: the largest box section 2 allows, 1 MiB of Big data (an
  ``UploadFile``'s data, an ``Execute``'s code) beside two 64 KiB values (an Execute's
  ``options``, ...) and small ones; keys: 64 for the arguments, plus the chunks of 1 MiB.

**Answers nobody reads.** The parser is also the transport's producer: when the answers
waiting to be written pass the transport's buffer size (64 KiB), the agent stops reading
from that connection until they drain, so a client that floods requests and never reads
the answers makes the agent buffer at most one read of requests and their answers.

**Waiting connections.** A connection must authenticate within the deadline
(``AgentConfig.authentication_deadline``, default ``AUTHENTICATION_DEADLINE``) of its
connect, whatever it sends meanwhile, and at most ``MAX_WAITING_CONNECTIONS`` may wait at
once (``WaitingRoom``). Authenticated connections never count.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from bai_agent.protocol.arguments import MAX_VALUE_LENGTH

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer, ITCPTransport
    from twisted.protocols import amp

    class IConnectionTransport(ITCPTransport, IConsumer):
        """
        What a manager connection's transport offers (TCP's, and the tests' fakes): it can
        be aborted and takes the protocol as its streaming producer. Only for the type
        checker, which cannot tell that from ``Protocol.transport``'s ``ITransport``.
        """

    # The mixin is only ever listed before ``amp.BinaryBoxProtocol``: it uses its parser.
    _BoxProtocol = amp.BinaryBoxProtocol
else:
    _BoxProtocol = object

#: The most Big data one call may carry (UploadFile ``data``, Execute ``code``).
MAX_BIG_DATA = 1 << 20
#: How many chunks (``key``, ``key.1``, ...) that many bytes take.
BIG_DATA_CHUNKS = math.ceil(MAX_BIG_DATA / MAX_VALUE_LENGTH)

#: Seconds a connection has to authenticate, from its connect.
AUTHENTICATION_DEADLINE = 5.0
#: Unauthenticated connections that may wait at once; past it the oldest is closed.
MAX_WAITING_CONNECTIONS = 256


@attrs.frozen
class BoxLimit:
    """The most one box may take on the wire (keys, values and their length prefixes)."""

    max_bytes: int
    max_keys: int


UNAUTHENTICATED = BoxLimit(max_bytes=4 << 10, max_keys=8)
AUTHENTICATED = BoxLimit(max_bytes=MAX_BIG_DATA + 2 * (64 << 10), max_keys=64 + BIG_DATA_CHUNKS)


@implementer(IPushProducer)
class BoundedBoxReceiver(_BoxProtocol):
    """
    A mixin for ``amp.BinaryBoxProtocol`` (and so ``amp.AMP``), listed before it: bounds
    each box by ``box_limit()`` and calls ``box_limit_exceeded(reason)`` (which closes the
    connection) the moment a box would pass it; nothing is parsed after that. It also
    registers itself as its transport's streaming producer (see the module docstring),
    ``IPushProducer`` with the parser's ``pauseProducing`` and ``resumeProducing``.

    It works on the parser's own state (``_unprocessed``, ``state``, ``stringReceived``),
    which ``Int16StringReceiver`` and ``StatefulStringProtocol`` have kept for many
    Twisted releases; ``tests/unit/test_rpc_limits.py`` pins the behaviour.
    """

    _box_bytes = 0  # wire bytes of the current box the parser has taken
    _box_keys = 0
    _held = b""  # bytes received while paused: at most one read of the transport
    _refused = False
    transport: IConnectionTransport | None

    def box_limit(self) -> BoxLimit:
        raise NotImplementedError

    def box_limit_exceeded(self, reason: str) -> None:
        raise NotImplementedError

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None  # makeConnection set it
        self.transport.registerProducer(self, True)

    def resumeProducing(self) -> None:
        transport = self.transport
        if transport is not None and getattr(transport, "disconnecting", False):
            # Closing: a transport with a paused producer would wait for it for ever
            # instead of finishing its close once the answers are out.
            transport.unregisterProducer()
            return
        super().resumeProducing()

    def stopProducing(self) -> None:
        # The transport is going away; it needs no call back (the default would make one).
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self.innerProtocol is not None:  # a protocol switch: no longer AMP
            super().dataReceived(data)
            return
        if self._held:
            data, self._held = self._held + data, b""
        if not data:
            # A resume: parse what the pause left in the parser.
            super().dataReceived(b"")
            return
        offset = 0
        while offset < len(data):
            if self.paused:
                self._held = data[offset:]
                return
            limit = self.box_limit()
            room = limit.max_bytes - self._box_bytes - len(self._unprocessed)
            if room <= 0:
                self._refuse(f"a box of more than {limit.max_bytes} bytes")
                return
            piece = data[offset : offset + room]
            offset += len(piece)
            super().dataReceived(piece)
            if self._refused or self._keyLengthLimitExceeded:
                return

    def stringReceived(self, string: bytes) -> None:
        if self._refused:
            return
        if self.state in ("init", "key"):
            if not string:
                # The empty key ends the box; the next one starts from nothing.
                self._box_bytes = self._box_keys = 0
            else:
                self._box_keys += 1
                limit = self.box_limit()
                if self._box_keys > limit.max_keys:
                    self._refuse(f"a box of more than {limit.max_keys} keys")
                    return
                self._box_bytes += 2 + len(string)
        else:
            self._box_bytes += 2 + len(string)
        super().stringReceived(string)

    def _refuse(self, reason: str) -> None:
        self._refused = True
        self._held = b""
        self._currentBox = None
        self._unprocessed = b""
        # Ends the parser's loop, if it is running, and drops what it holds.
        self.recvd = b""
        self.box_limit_exceeded(reason)


Connection = TypeVar("Connection", bound=Hashable)


class WaitingRoom(Generic[Connection]):
    """
    The connections that have not authenticated yet, oldest first, at most ``capacity``.

    Past the cap the oldest waiting connection is closed to make room, rather than the
    newest refused. A manager authenticates within a round trip or two of its connect, so
    to push a manager's fresh connection out, a flood must open ``capacity`` connections
    within that time, every time a manager connects; refusing the newest instead would
    let ``capacity`` sockets, renewed at each deadline (some 50 connects a second), keep
    every manager out for as long as the flood lasts. Authenticated connections are never
    here: a manager gets in as long as the process has a file descriptor for it.
    """

    def __init__(self, capacity: int = MAX_WAITING_CONNECTIONS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._waiting: collections.OrderedDict[Connection, None] = collections.OrderedDict()

    def enter(self, connection: Connection) -> list[Connection]:
        """Admit ``connection``; the connections to close to make room for it, oldest first."""
        self._waiting[connection] = None
        evicted: list[Connection] = []
        while len(self._waiting) > self.capacity:
            oldest, _ = self._waiting.popitem(last=False)
            evicted.append(oldest)
        return evicted

    def leave(self, connection: Connection) -> None:
        self._waiting.pop(connection, None)

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, connection: object) -> bool:
        return connection in self._waiting
