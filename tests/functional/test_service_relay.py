"""
ServiceRelay on the real reactor: real TCP clients, a real UNIX-socket server in a short
temporary directory under /tmp, and the bytes, half-closes, drops and bounds between them.
"""

import hashlib
import os
import shutil
import tempfile

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from bai_agent.services.ports import PortPool
from bai_agent.services.relay import RelayListenError, ServiceRelay
from bai_agent.testing.waiting import sleep, wait_until

pytestmark = pytest.mark.functional

MB = 1024 * 1024


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="bai-relay-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@implementer(IHalfCloseableProtocol)
class EchoServer(Protocol):
    """Echoes with back-pressure (its own transport is its producer) and passes EOF back."""

    def connectionMade(self):
        self.factory.accepted.append(self)
        self.received = b""
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data):
        if self.factory.keep:
            self.received += data
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.lost.append(self)


@implementer(IHalfCloseableProtocol)
class CountAfterEof(Protocol):
    """Answers how many bytes it got once the client has ended writing."""

    def connectionMade(self):
        self.count = 0

    def dataReceived(self, data):
        self.count += len(data)

    def readConnectionLost(self):
        self.transport.write(b"got %d bytes" % self.count)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class SaysByeAndCloses(Protocol):
    def connectionMade(self):
        self.transport.write(b"bye")
        self.transport.loseConnection()


def server_factory(protocol, keep=False):
    factory = Factory.forProtocol(protocol)
    factory.accepted = []
    factory.lost = []
    factory.keep = keep
    return factory


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    def __init__(self):
        self.data = b""
        self.done = Deferred()
        self.eof = False

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.data)


def connect(reactor, port, protocol=None):
    protocol = protocol or Client()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return endpoint.connect(Factory.forProtocol(lambda: protocol))


@pytest_twisted.inlineCallbacks
def started(reactor, socket_dir, protocol=EchoServer, keep=False, **options):
    path = os.path.join(socket_dir, "svc.sock")
    server = server_factory(protocol, keep)
    unix_port = reactor.listenUNIX(path, server)
    relay = ServiceRelay(reactor, path, **options)
    listening = yield relay.listen(reactor, "127.0.0.1", 0)
    return relay, listening.getHost().port, server, unix_port


@pytest.fixture
def cleanup():
    waits = []
    yield waits
    for item in reversed(waits):
        pytest_twisted.blockon(item())


@pytest_twisted.inlineCallbacks
def test_thirty_concurrent_connections_each_get_their_own_bytes(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir)
    cleanup += [unix_port.stopListening, relay.stop]
    clients = [Client() for _ in range(30)]
    for client in clients:
        yield connect(reactor, port, client)
    payloads = [os.urandom(100 * 1024) for _ in clients]
    for client, payload in zip(clients, payloads):
        client.transport.write(payload)
        client.transport.loseWriteConnection()
    for client, payload in zip(clients, payloads):
        assert (yield client.done) == payload
    yield wait_until(reactor, lambda: relay.open_connections == 0, 10, "every pair closed")
    assert relay.counters.connections == 30
    assert relay.counters.bytes_to_service == relay.counters.bytes_to_client == 30 * 100 * 1024
    assert len(server.accepted) == 30


class PatternSender:
    """A pull producer that writes ``total`` bytes of a counter pattern, hashing them."""

    def __init__(self, transport, total, chunk=256 * 1024):
        self.transport = transport
        self.left = total
        self.chunk = chunk
        self.counter = 0
        self.digest = hashlib.sha256()

    def resumeProducing(self):
        if self.left <= 0:
            return
        size = min(self.chunk, self.left)
        block = (b"%016d" % self.counter) * (size // 16)
        self.counter += 1
        self.left -= size
        self.digest.update(block)
        self.transport.write(block)
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def stopProducing(self):
        self.left = 0


@implementer(IHalfCloseableProtocol)
class SlowReader(Client):
    """Reads a MB, then stops reading for a while: the relay must hold, not buffer."""

    def __init__(self, reactor):
        super().__init__()
        self.reactor = reactor
        self.digest = hashlib.sha256()
        self.count = 0
        self.since_pause = 0

    def dataReceived(self, data):
        self.digest.update(data)
        self.count += len(data)
        self.since_pause += len(data)
        if self.since_pause >= MB:
            self.since_pause = 0
            self.transport.pauseProducing()
            self.reactor.callLater(0.02, self.transport.resumeProducing)


@pytest_twisted.inlineCallbacks
def test_64_mb_both_ways_with_a_slow_reader_keeps_the_relay_buffers_bounded(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir)
    cleanup += [unix_port.stopListening, relay.stop]
    reader = SlowReader(reactor)
    yield connect(reactor, port, reader)
    highest = [0]

    def sample():
        highest[0] = max(highest[0], relay.buffered_bytes())

    sampler = LoopingCall(sample)
    sampler.start(0.005)
    sender = PatternSender(reader.transport, 64 * MB)
    reader.transport.registerProducer(sender, False)
    try:
        yield reader.done
    finally:
        sampler.stop()
    assert reader.count == 64 * MB
    assert reader.digest.hexdigest() == sender.digest.hexdigest()
    assert relay.counters.bytes_to_service == relay.counters.bytes_to_client == 64 * MB
    assert 0 < highest[0] < 4 * MB, f"the relay buffered up to {highest[0]} bytes"


@pytest_twisted.inlineCallbacks
def test_half_close_client_ends_writing_and_still_gets_the_answer(reactor, socket_dir, cleanup):
    relay, port, _, unix_port = yield started(reactor, socket_dir, CountAfterEof)
    cleanup += [unix_port.stopListening, relay.stop]
    client = Client()
    yield connect(reactor, port, client)
    client.transport.write(b"x" * 5000)
    client.transport.loseWriteConnection()
    assert (yield client.done) == b"got 5000 bytes"
    assert client.eof


@pytest_twisted.inlineCallbacks
def test_unix_side_going_away_closes_the_client(reactor, socket_dir, cleanup):
    relay, port, _, unix_port = yield started(reactor, socket_dir, SaysByeAndCloses)
    cleanup += [unix_port.stopListening, relay.stop]
    client = Client()
    yield connect(reactor, port, client)
    assert (yield client.done) == b"bye"
    yield wait_until(reactor, lambda: relay.open_connections == 0, 10, "the pair closed")


@pytest_twisted.inlineCallbacks
def test_server_dropping_an_idle_connection_closes_the_client(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir)
    cleanup += [unix_port.stopListening, relay.stop]
    client = Client()
    yield connect(reactor, port, client)
    yield wait_until(reactor, lambda: server.accepted, 10, "the service side connected")
    server.accepted[0].transport.abortConnection()
    yield client.done
    yield wait_until(reactor, lambda: relay.open_connections == 0, 10, "the pair closed")


@pytest_twisted.inlineCallbacks
def test_client_dropping_closes_the_service_side(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir)
    cleanup += [unix_port.stopListening, relay.stop]
    client = Client()
    yield connect(reactor, port, client)
    yield wait_until(reactor, lambda: server.accepted, 10, "the service side connected")
    client.transport.abortConnection()
    yield wait_until(reactor, lambda: server.lost, 10, "the service side closed")
    yield wait_until(reactor, lambda: relay.open_connections == 0, 10, "the pair closed")


@pytest_twisted.inlineCallbacks
def test_stop_closes_every_connection_and_the_port(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir)
    cleanup.append(unix_port.stopListening)
    clients = [Client() for _ in range(5)]
    for client in clients:
        yield connect(reactor, port, client)
    yield wait_until(reactor, lambda: len(server.accepted) == 5, 10, "five service connections")
    yield relay.stop()
    for client in clients:
        yield client.done
    assert relay.open_connections == 0
    yield wait_until(reactor, lambda: len(server.lost) == 5, 10, "every service connection closed")
    with pytest.raises(Exception, match="refused|Connection"):
        yield connect(reactor, port)


@pytest_twisted.inlineCallbacks
def test_connections_beyond_the_bound_are_closed_at_once(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir, max_connections=3)
    cleanup += [unix_port.stopListening, relay.stop]
    clients = [Client() for _ in range(3)]
    for client in clients:
        yield connect(reactor, port, client)
    yield wait_until(reactor, lambda: len(server.accepted) == 3, 10, "three service connections")
    extra = Client()
    yield connect(reactor, port, extra)
    yield extra.done
    assert relay.counters.refused == 1
    assert len(server.accepted) == 3
    clients[0].transport.write(b"still here")
    yield wait_until(reactor, lambda: clients[0].data == b"still here", 10, "the echo")


@pytest_twisted.inlineCallbacks
def test_a_missing_service_socket_closes_the_client(reactor, socket_dir, cleanup):
    relay = ServiceRelay(reactor, os.path.join(socket_dir, "absent.sock"))
    listening = yield relay.listen(reactor, "127.0.0.1", 0)
    cleanup.append(relay.stop)
    client = Client()
    yield connect(reactor, listening.getHost().port, client)
    assert (yield client.done) == b""
    assert relay.counters.failed == 1
    assert relay.open_connections == 0


@pytest_twisted.inlineCallbacks
def test_a_taken_port_is_a_clear_error(reactor, socket_dir, cleanup):
    holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    cleanup.append(holder.stopListening)
    relay = ServiceRelay(reactor, os.path.join(socket_dir, "svc.sock"))
    taken = holder.getHost().port
    with pytest.raises(RelayListenError, match=f"127.0.0.1:{taken}"):
        yield relay.listen(reactor, "127.0.0.1", taken)


@pytest_twisted.inlineCallbacks
def test_nothing_a_client_sends_chooses_where_the_relay_connects(reactor, socket_dir, cleanup):
    relay, port, server, unix_port = yield started(reactor, socket_dir, keep=True)
    cleanup += [unix_port.stopListening, relay.stop]
    decoy_path = os.path.join(socket_dir, "decoy.sock")
    decoy_unix = server_factory(EchoServer)
    decoy_tcp = server_factory(EchoServer)
    decoy_unix_port = reactor.listenUNIX(decoy_path, decoy_unix)
    decoy_tcp_port = reactor.listenTCP(0, decoy_tcp, interface="127.0.0.1")
    cleanup += [decoy_unix_port.stopListening, decoy_tcp_port.stopListening]
    decoy = decoy_tcp_port.getHost().port
    attacks = [
        b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 %d\r\n" % decoy,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01" + decoy.to_bytes(2, "big") * 2,
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy, decoy),
        b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy, decoy),
        b"GET / HTTP/1.1\r\nHost: unix:" + decoy_path.encode() + b"\r\nX-Forwarded-Host: evil\r\n\r\n",
        decoy_path.encode() + b"\n",
    ]
    for attack in attacks:
        client = Client()
        yield connect(reactor, port, client)
        client.transport.write(attack)
        client.transport.loseWriteConnection()
        assert (yield client.done) == attack  # copied, not interpreted
    assert [accepted.received for accepted in server.accepted] == attacks
    assert decoy_unix.accepted == [] and decoy_tcp.accepted == []
    yield sleep(reactor, 0.05)


@pytest_twisted.inlineCallbacks
def test_the_port_pool_skips_a_port_something_else_holds(reactor, socket_dir, cleanup):
    holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    cleanup.append(holder.stopListening)
    taken = holder.getHost().port
    pool = PortPool(reactor, taken, min(taken + 20, 65535))
    relay = ServiceRelay(reactor, os.path.join(socket_dir, "svc.sock"))
    port, listening = yield pool.allocate_bound("kernel-1", lambda p: relay.listen(reactor, "127.0.0.1", p))
    cleanup.append(relay.stop)
    assert port != taken and listening.getHost().port == port
    assert pool.owned_by("kernel-1") == [port]
    assert pool.is_cooling(taken)
