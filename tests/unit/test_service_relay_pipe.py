"""
The relay's pipe logic on a MemoryReactorClock and StringTransports: where it connects,
who produces for whom, half-closes, drops, the bound and ``stop``.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from bai_agent.services.relay import ServiceRelay
from bai_agent.testing.deferreds import has_fired, result_of

PATH = "/run/bai/kernel-1/services/jupyter.sock"


class Transport(StringTransport):
    """A StringTransport that also half-closes and tells its protocol it was closed."""

    def __init__(self):
        super().__init__()
        self.write_closed = False
        self.protocol = None

    def loseWriteConnection(self):
        self.write_closed = True

    def lose(self):
        if self.protocol is not None and not self.disconnected:
            self.disconnected = True
            self.protocol.connectionLost(Failure(ConnectionRefusedError()))


class Harness:
    def __init__(self, **options):
        self.reactor = MemoryReactorClock()
        self.relay = ServiceRelay(self.reactor, PATH, **options)
        result_of(self.relay.listen(self.reactor, "127.0.0.1", 30000))
        [(self.port, self.factory, _backlog, self.interface)] = self.reactor.tcpServers

    def client(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 5555))
        transport = Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def service(self, index=-1):
        address, factory, _timeout, _check = self.reactor.unixClients[index]
        assert address == PATH
        protocol = factory.buildProtocol(None)
        transport = Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def pair(self):
        client, client_transport = self.client()
        service, service_transport = self.service()
        return client, client_transport, service, service_transport


def test_listens_where_asked():
    harness = Harness()
    assert (harness.port, harness.interface) == (30000, "127.0.0.1")
    assert harness.relay.listening_port is not None


def test_client_is_paused_until_the_service_side_connects():
    harness = Harness()
    client, client_transport = harness.client()
    assert client_transport.producerState == "paused"
    assert [c[0] for c in harness.reactor.unixClients] == [PATH]
    harness.service()
    assert client_transport.producerState == "producing"
    assert harness.relay.counters.connections == 1


def test_each_transport_produces_for_the_other():
    harness = Harness()
    _, client_transport, _, service_transport = harness.pair()
    assert client_transport.producer is service_transport and client_transport.streaming
    assert service_transport.producer is client_transport and service_transport.streaming


def test_bytes_are_copied_both_ways_and_counted():
    harness = Harness()
    client, client_transport, service, service_transport = harness.pair()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: elsewhere:80\r\n\r\n")
    service.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert service_transport.value() == b"GET / HTTP/1.1\r\nHost: elsewhere:80\r\n\r\n"
    assert client_transport.value() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert harness.relay.counters.bytes_to_service == 38
    assert harness.relay.counters.bytes_to_client == 19
    # whatever the client said, the relay made one connection, to its one path
    assert [c[0] for c in harness.reactor.unixClients] == [PATH]


def test_bytes_before_the_service_side_are_passed_on_then():
    harness = Harness()
    client, _ = harness.client()
    client.dataReceived(b"early")
    _, service_transport = harness.service()
    assert service_transport.value() == b"early"


def test_too_many_early_bytes_close_the_client():
    harness = Harness()
    client, client_transport = harness.client()
    client.dataReceived(b"x" * (64 * 1024 + 1))
    assert client_transport.disconnected


def test_client_half_close_ends_writing_to_the_service():
    harness = Harness()
    client, client_transport, service, service_transport = harness.pair()
    client.readConnectionLost()
    assert service_transport.write_closed and not service_transport.disconnecting
    service.dataReceived(b"answer")
    assert client_transport.value() == b"answer"
    service.readConnectionLost()
    assert client_transport.write_closed
    # both directions ended: both closed
    assert client_transport.disconnecting and service_transport.disconnecting


def test_half_close_before_the_service_side_is_passed_on_when_it_connects():
    harness = Harness()
    client, _ = harness.client()
    client.readConnectionLost()
    _, service_transport = harness.service()
    assert service_transport.write_closed


def test_service_dropping_closes_the_client():
    harness = Harness()
    _, client_transport, _, service_transport = harness.pair()
    service_transport.lose()
    assert client_transport.disconnecting
    client_transport.lose()
    assert harness.relay.open_connections == 0


def test_client_dropping_closes_the_service_side():
    harness = Harness()
    _, client_transport, _, service_transport = harness.pair()
    client_transport.lose()
    assert service_transport.disconnecting
    service_transport.lose()
    assert harness.relay.open_connections == 0


def test_client_dropping_while_connecting_cancels_the_connect():
    harness = Harness()
    _, client_transport = harness.client()
    client_transport.lose()
    [connector] = harness.reactor.connectors
    assert connector.stoppedConnecting
    assert harness.relay.open_connections == 0
    assert harness.relay.counters.failed == 0  # the client left: not the service's failure


def test_unreachable_service_closes_the_client():
    harness = Harness()
    _, client_transport = harness.client()
    _, factory, _, _ = harness.reactor.unixClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert client_transport.disconnected
    assert harness.relay.counters.failed == 1
    assert harness.relay.open_connections == 0


def test_connections_beyond_the_bound_are_closed_at_once():
    harness = Harness(max_connections=2)
    harness.pair()
    harness.pair()
    _, extra = harness.client()
    assert extra.disconnected
    assert harness.relay.counters.refused == 1
    assert len(harness.reactor.unixClients) == 2


def test_stop_closes_every_pair_and_fires_when_they_are_gone():
    harness = Harness()
    pairs = [harness.pair() for _ in range(3)]
    stopped = harness.relay.stop()
    assert harness.relay.listening_port is None
    for _, client_transport, _, service_transport in pairs:
        assert client_transport.disconnected and service_transport.disconnected
    assert not has_fired(stopped)
    for client, _, service, _ in pairs:
        client.connectionLost(Failure(ConnectionRefusedError()))
        service.connectionLost(Failure(ConnectionRefusedError()))
    assert has_fired(stopped)
    assert harness.relay.open_connections == 0


def test_stop_with_nothing_open():
    harness = Harness()
    assert has_fired(harness.relay.stop())


def test_a_connection_with_no_byte_either_way_for_the_idle_timeout_is_closed():
    harness = Harness(idle_timeout=100)
    client, client_transport, service, service_transport = harness.pair()
    busy_client, busy_transport, busy_service, _ = harness.pair()
    for _ in range(6):
        harness.reactor.advance(20)
        busy_client.dataReceived(b"ping")
        busy_service.dataReceived(b"pong")
    assert client_transport.disconnected and service_transport.disconnected
    assert not busy_transport.disconnected
    assert harness.relay.counters.idle_closed == 1


def test_a_connection_that_only_receives_is_not_idle():
    harness = Harness(idle_timeout=100)
    _client, client_transport, service, _ = harness.pair()
    for _ in range(10):
        harness.reactor.advance(30)
        service.dataReceived(b"x" * 10)
    assert not client_transport.disconnected
    assert harness.relay.counters.idle_closed == 0


def test_no_idle_timeout_and_no_sweep_after_stop():
    harness = Harness(idle_timeout=0)
    _, client_transport, _, _ = harness.pair()
    harness.reactor.advance(10**6)
    assert not client_transport.disconnected
    stopping = Harness(idle_timeout=100)
    stopping.relay.stop()
    assert not stopping.reactor.getDelayedCalls()
