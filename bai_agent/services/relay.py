"""
The relay that makes a kernel's service reachable without any container network
(docs/protocol.md section 7): it listens on a host TCP port and pipes every accepted
connection to one UNIX socket, the kernel's service socket, fixed when the relay is made.

Nothing a client sends chooses where the relay connects: the bytes are never parsed (no
HTTP ``Host``, no PROXY line), only copied. Each pair of connections copies with
back-pressure both ways (each transport is the other's streaming producer, so a side whose
write buffer is full stops the other side's reading: the relay holds at most about one
socket buffer per direction, whatever a slow reader does), passes half-closes on, and
closes one side when the other drops. The number of connections at once is bounded; a
client beyond the bound is closed at once, and a connection through which nothing passed
either way for ``idle_timeout`` seconds is closed (a forgotten tab must not hold one of the
bounded connections, and its sockets, for ever).
"""

from typing import Any, Optional, Union, cast

import attrs
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IReactorTCP, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["RelayCounters", "RelayListenError", "ServiceRelay"]

log = Logger()

MAX_CONNECTIONS = 256
CONNECT_TIMEOUT = 10.0
#: Seconds without a byte either way after which a relayed connection is closed. Jupyter's
#: websockets ping far more often than this, so only abandoned connections reach it.
IDLE_TIMEOUT = 3600.0
#: The longest between two sweeps for idle connections.
MAX_SWEEP_INTERVAL = 60.0
# What a client may send before the service side is connected (its reading is paused by
# then; this only bounds what a transport may still deliver).
MAX_EARLY_BYTES = 64 * 1024


class RelayListenError(CannotListenError):
    """
    The relay cannot listen on the host port asked for (taken, or not allowed). A
    ``CannotListenError``, so that ``PortPool.allocate_bound`` tries the next port.
    """

    def __init__(self, interface: str, port: int, socket_error: BaseException, socket_path: str) -> None:
        super().__init__(interface, port, socket_error)
        self.socket_path = socket_path

    def __str__(self) -> str:
        return f"cannot listen on {self.interface}:{self.port} for {self.socket_path}: {self.socketError}"


@attrs.define
class RelayCounters:
    """What the relay did, for the metrics: connections and bytes each way."""

    connections: int = 0  # relayed (the service side connected)
    refused: int = 0  # closed at once: over the bound
    failed: int = 0  # the service socket could not be reached
    idle_closed: int = 0  # relayed, then closed after idle_timeout without a byte
    bytes_to_service: int = 0
    bytes_to_client: int = 0

    def add(self, other: "RelayCounters") -> None:
        """Add ``other``'s counts to these (the totals of relays that closed)."""
        for field in attrs.fields_dict(RelayCounters):
            setattr(self, field, getattr(self, field) + getattr(other, field))


def _buffered(transport: Optional[Any]) -> int:
    """Bytes a Twisted socket transport holds unwritten (best effort; 0 if unknown)."""
    if transport is None:
        return 0
    data = getattr(transport, "dataBuffer", b"")
    return len(data) + int(getattr(transport, "_tempDataLen", 0)) - int(getattr(transport, "offset", 0))


def _transport(side: "_Side") -> Any:
    """A side's transport: a TCP or UNIX socket transport (pause, abort, half-close)."""
    return side.transport


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """One end of a pair: what it reads it writes to the other end."""

    def __init__(self, pair: "_Pair") -> None:
        self.pair = pair
        self.read_done = False
        self.write_done = False
        self.lost = False

    def readConnectionLost(self) -> None:
        # The peer ended writing: end writing to the other side, once what it has is sent.
        self.read_done = True
        self.pair.half_closed(self)

    def writeConnectionLost(self) -> None:
        self.write_done = True
        self.pair.maybe_closed(self)


class _ClientSide(_Side):
    def connectionMade(self) -> None:
        self.pair.client_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.from_client(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pair.side_lost(self)


class _ServiceSide(_Side):
    def dataReceived(self, data: bytes) -> None:
        self.pair.from_service(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pair.side_lost(self)


class _Pair:
    """A client connection and its service connection."""

    def __init__(self, relay: "ServiceRelay") -> None:
        self.relay = relay
        self.client = _ClientSide(self)
        self.service: Optional[_ServiceSide] = None
        self.connecting: Optional[Deferred[Any]] = None
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.closing = False
        self.closed: Deferred[None] = Deferred()
        self.last_active = relay.now()

    # -- the client connected ---------------------------------------------------------------

    def client_connected(self, client: _ClientSide) -> None:
        relay = self.relay
        if len(relay._pairs) >= relay.max_connections:
            relay.counters.refused += 1
            log.info(
                "service relay {path}: {count} connections at once, closing a new one",
                path=relay.socket_path,
                count=len(relay._pairs),
            )
            _transport(client).abortConnection()
            return
        relay._pairs.add(self)
        _transport(client).pauseProducing()  # until the service side is there
        service = _ServiceSide(self)
        self.connecting = relay._connect(service)
        self.connecting.addCallbacks(self.service_connected, self.service_failed)

    def service_connected(self, service: _ServiceSide) -> None:
        self.connecting = None
        if self.closing or self.client.lost:
            _transport(service).abortConnection()
            self.service = service
            return
        self.service = service
        self.last_active = self.relay.now()
        self.relay.counters.connections += 1
        client_transport = _transport(self.client)
        service_transport = _transport(service)
        # Each side is the other's producer: a full write buffer pauses the other's reading.
        client_transport.registerProducer(service_transport, True)
        service_transport.registerProducer(client_transport, True)
        if self.early:
            data, self.early = b"".join(self.early), []
            self.from_client(data)
        if self.client.read_done:
            self.half_closed(self.client)
        else:
            client_transport.resumeProducing()

    def service_failed(self, reason: Failure) -> None:
        self.connecting = None
        if not self.closing:
            self.relay.counters.failed += 1
            log.warn(
                "service relay: cannot reach {path}: {error}",
                path=self.relay.socket_path,
                error=reason.getErrorMessage(),
            )
        _transport(self.client).abortConnection()
        self.finish()

    # -- bytes ----------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.service is None or self.service.transport is None:
            self.early.append(data)
            self.early_bytes += len(data)
            if self.early_bytes > MAX_EARLY_BYTES:
                self.abort()
            return
        self.relay.counters.bytes_to_service += len(data)
        _transport(self.service).write(data)

    def from_service(self, data: bytes) -> None:
        self.last_active = self.relay.now()
        self.relay.counters.bytes_to_client += len(data)
        _transport(self.client).write(data)

    # -- ends -----------------------------------------------------------------------------------

    def other(self, side: _Side) -> Optional[_Side]:
        return self.service if side is self.client else self.client

    def half_closed(self, side: _Side) -> None:
        other = self.other(side)
        if other is None or other.transport is None:
            return  # the service side is not there yet: service_connected passes it on
        if not other.lost:
            _transport(other).loseWriteConnection()
        self.maybe_closed(side)

    def maybe_closed(self, side: _Side) -> None:
        # Both directions ended: nothing more can pass, close both.
        other = self.other(side)
        if other is None:
            return
        if self.client.read_done and self.service is not None and self.service.read_done:
            self.close()

    def side_lost(self, side: _Side) -> None:
        other = self.other(side)
        if other is not None and not other.lost and other.transport is not None:
            # What was already read from the lost side still reaches the other one.
            _transport(other).loseConnection()
        if self.connecting is not None and side is self.client:
            self.closing = True  # the client left: not a failure of the service
            self.connecting.cancel()
        if self.client.lost and (self.service is None or self.service.lost):
            self.finish()

    def close(self) -> None:
        for side in (self.client, self.service):
            if side is not None and not side.lost and side.transport is not None:
                _transport(side).loseConnection()

    def abort(self) -> None:
        self.closing = True
        if self.connecting is not None:
            self.connecting.cancel()
        for side in (self.client, self.service):
            if side is not None and not side.lost and side.transport is not None:
                _transport(side).abortConnection()

    def finish(self) -> None:
        if self in self.relay._pairs:
            self.relay._pairs.discard(self)
        if not self.closed.called:
            self.closed.callback(None)

    def buffered(self) -> int:
        return _buffered(self.client.transport) + _buffered(self.service.transport if self.service else None)


class _RelayFactory(Factory):
    def __init__(self, relay: "ServiceRelay") -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> Protocol:
        # The client's address is logged at most; it never chooses anything.
        return _Pair(self.relay).client


class ServiceRelay:
    """
    Relays TCP connections on a host port to the UNIX socket ``socket_path``.

    :param reactor: connects to the UNIX socket (and listens, in ``listen``).
    :param socket_path: the kernel's service socket: the only place the relay connects to.
    :param max_connections: connections at once; a client beyond them is closed at once.
    :param connect_timeout: seconds to reach the UNIX socket before the client is closed.
    :param idle_timeout: seconds without a byte either way before a relayed connection is
        closed (0: never).
    """

    def __init__(
        self,
        reactor: IReactorUNIX,
        socket_path: str,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections {max_connections} must be at least 1")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout {idle_timeout} is negative")
        self._reactor = reactor
        self.socket_path = socket_path
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.counters = RelayCounters()
        self.factory = _RelayFactory(self)
        self._pairs: set[_Pair] = set()
        self._port: Optional[IListeningPort] = None
        self._sweeping: Optional[LoopingCall] = None

    def now(self) -> float:
        return cast(Any, self._reactor).seconds()

    @property
    def open_connections(self) -> int:
        """Client connections open now (relayed, or waiting for the service side)."""
        return len(self._pairs)

    @property
    def listening_port(self) -> Optional[IListeningPort]:
        """The listening port while listening."""
        return self._port

    def buffered_bytes(self) -> int:
        """Bytes the relay's transports hold unwritten, all pairs together (a bound to check)."""
        return sum(pair.buffered() for pair in self._pairs)

    def _connect(self, service: _ServiceSide) -> "Deferred[Any]":
        endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=self.connect_timeout)
        return endpoint.connect(Factory.forProtocol(lambda: service))

    def listen(self, reactor: IReactorTCP, host: str, port: int) -> "Deferred[IListeningPort]":
        """
        Listen on ``host``:``port`` (``port`` 0 picks a free one: tests). Fails with
        ``RelayListenError`` when the port is taken, so that the port pool tries the next.
        """
        if self._port is not None:
            raise RuntimeError("the relay is already listening")
        endpoint: Union[TCP4ServerEndpoint, TCP6ServerEndpoint]
        if ":" in host:
            endpoint = TCP6ServerEndpoint(reactor, port, interface=host)
        else:
            endpoint = TCP4ServerEndpoint(reactor, port, interface=host)
        d: Deferred[IListeningPort] = endpoint.listen(self.factory)

        def listening(listening_port: IListeningPort) -> IListeningPort:
            self._port = listening_port
            if self.idle_timeout > 0:
                self._sweeping = LoopingCall(self._close_idle)
                self._sweeping.clock = cast(Any, self._reactor)
                self._sweeping.start(min(MAX_SWEEP_INTERVAL, self.idle_timeout / 2), now=False)
            return listening_port

        def cannot(reason: Failure) -> Failure:
            reason.trap(CannotListenError)
            error = cast(CannotListenError, reason.value)
            raise RelayListenError(host, port, error.socketError, self.socket_path)

        d.addCallbacks(listening, cannot)
        return d

    def _close_idle(self) -> None:
        deadline = self.now() - self.idle_timeout
        for pair in list(self._pairs):
            if pair.service is not None and not pair.closing and pair.last_active <= deadline:
                self.counters.idle_closed += 1
                log.info(
                    "service relay {path}: closing a connection idle for {idle:g}s",
                    path=self.socket_path,
                    idle=self.idle_timeout,
                )
                pair.abort()

    def stop(self) -> "Deferred[None]":
        """
        Stop listening and close every open pair at once (a slow reader must not hold the
        kernel's end); fires when the port is closed and every connection is gone.
        """
        waits: list[Deferred[Any]] = []
        if self._sweeping is not None and self._sweeping.running:
            self._sweeping.stop()
        self._sweeping = None
        if self._port is not None:
            port, self._port = self._port, None
            waits.append(maybeDeferred(port.stopListening))
        for pair in list(self._pairs):
            waits.append(pair.closed)
            pair.abort()
        if not waits:
            return succeed(None)
        d = DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)
