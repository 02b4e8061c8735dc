"""The AMP server: session rules, authentication, robustness against bad input."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from bai_agent.protocol import commands, errors
from bai_agent.protocol.auth import compute_mac
from bai_agent.protocol.client import AgentClient, ManagerLocator
from bai_agent.rpc.server import MAX_FAILED_AUTHENTICATIONS
from tests.agent_parts import SECRET, AgentParts, StubDocker, StubEtcd  # noqa: F401 (shared)


class Harness:
    def __init__(self, tmp_path, clock=None, **parts):
        self.clock = clock if clock is not None else Clock()
        self.state = AgentParts(self.clock, tmp_path, **parts)
        self.factory = self.state.amp_factory()

    def connect(self):
        """A manager connection: (AgentClient, server protocol, pump)."""
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        client_protocol = amp.AMP(locator=ManagerLocator())
        client_protocol, server, pump = iosim.connectedServerAndClient(
            lambda: server, lambda: client_protocol, greet=True, clock=self.clock
        )
        return AgentClient(client_protocol), server, pump

    def call(self, pump, d):
        # Attach before delivering: AMP drops a connection whose error answer finds no errback.
        results = []
        d.addBoth(results.append)
        pump.flush()
        assert results, "no answer"
        return results[0]


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


def authenticate(harness, client, pump):
    hello = harness.call(pump, client.hello())
    return harness.call(pump, client.authenticate(SECRET, hello["nonce"]))


def closed(protocol):
    return protocol.transport is None or bool(protocol.transport.disconnecting)


def failure_type(result):
    assert hasattr(result, "check"), f"expected a failure, got {result!r}"
    return result.type


def test_hello_gives_identity_and_a_fresh_nonce_per_connection(harness):
    client, _, pump = harness.connect()
    other, _, other_pump = harness.connect()
    hello = harness.call(pump, client.hello())
    assert hello["agent_id"] == "agent-1"
    assert hello["protocol"] == commands.PROTOCOL_VERSION
    assert len(hello["nonce"]) == 32
    assert harness.call(other_pump, other.hello())["nonce"] != hello["nonce"]


def test_commands_before_authentication_answer_not_authenticated(harness):
    client, server, pump = harness.connect()
    for call in (client.get_agent_info, client.list_images, lambda: client.ping("x")):
        assert failure_type(harness.call(pump, call())) is errors.NotAuthenticated
    assert not closed(server)


def test_authenticated_connection_gets_agent_info(harness):
    client, _, pump = harness.connect()
    assert authenticate(harness, client, pump) == {}
    info = harness.call(pump, client.get_agent_info())
    assert info["agent_id"] == "agent-1"
    assert info["resources"]["cpu"] == {"capacity": 4.0, "used": 0}
    assert info["images"] == ["bai-kernel/python:3.11"]
    assert harness.call(pump, client.ping("hi")) == "hi"
    assert harness.call(pump, client.list_images())[0]["name"] == "bai-kernel/python:3.11"


def test_wrong_mac_fails_and_the_third_failure_closes_the_connection(harness):
    client, server, pump = harness.connect()
    nonce = harness.call(pump, client.hello())["nonce"]
    for attempt in range(MAX_FAILED_AUTHENTICATIONS):
        result = harness.call(pump, client.authenticate("00" * 32, nonce))
        assert failure_type(result) is errors.AuthFailed
        harness.clock.advance(0)
        pump.flush()
        assert closed(server) is (attempt == MAX_FAILED_AUTHENTICATIONS - 1)


def test_mac_of_another_connections_nonce_is_refused(harness):
    client, _, pump = harness.connect()
    other, _, other_pump = harness.connect()
    harness.call(pump, client.hello())
    other_nonce = harness.call(other_pump, other.hello())["nonce"]
    result = harness.call(pump, client.protocol.callRemote(commands.Authenticate, mac=compute_mac(SECRET, other_nonce)))
    assert failure_type(result) is errors.AuthFailed


def test_authenticate_without_a_secret_is_backend_unavailable(harness):
    harness.state.etcd.secret = None
    client, _, pump = harness.connect()
    result = authenticate(harness, client, pump)
    assert failure_type(result) is errors.BackendUnavailable


def test_list_images_with_docker_down_is_backend_unavailable(harness):
    harness.state.docker.healthy = False
    harness.state.docker.last_error = "connection refused"
    client, _, pump = harness.connect()
    authenticate(harness, client, pump)
    result = harness.call(pump, client.list_images())
    assert failure_type(result) is errors.BackendUnavailable
    assert "connection refused" in str(result.value)


def test_missing_argument_is_invalid_request_and_connection_survives(harness):
    client, server, pump = harness.connect()
    authenticate(harness, client, pump)

    class PingWithoutPayload(amp.Command):
        commandName = b"Ping"
        arguments = []
        response = [(b"payload", amp.Unicode())]
        errors = {errors.InvalidRequest: errors.InvalidRequest.code}

    result = harness.call(pump, client.protocol.callRemote(PingWithoutPayload))
    assert failure_type(result) is errors.InvalidRequest
    assert "payload" in str(result.value)
    assert harness.call(pump, client.ping("still here")) == "still here"


def test_bad_json_argument_is_invalid_request(harness):
    client, _, pump = harness.connect()
    authenticate(harness, client, pump)

    class RawCreate(amp.Command):
        commandName = b"CreateKernel"
        arguments = [(b"kernel_id", amp.Unicode()), (b"image", amp.Unicode()), (b"resources", amp.String())]
        response = []
        errors = {errors.InvalidRequest: errors.InvalidRequest.code}

    result = harness.call(pump, client.protocol.callRemote(RawCreate, kernel_id="k", image="i", resources=b"{nope"))
    assert failure_type(result) is errors.InvalidRequest
    assert "bad arguments for CreateKernel" in str(result.value)


def test_text_that_is_not_utf8_is_invalid_request(harness):
    client, _, pump = harness.connect()
    authenticate(harness, client, pump)

    class RawPing(amp.Command):
        commandName = b"Ping"
        arguments = [(b"payload", amp.String())]
        response = [(b"payload", amp.String())]
        errors = {errors.InvalidRequest: errors.InvalidRequest.code}

    result = harness.call(pump, client.protocol.callRemote(RawPing, payload=b"\xff\xfe"))
    assert failure_type(result) is errors.InvalidRequest


def test_every_manager_command_has_a_responder(harness):
    _, server, _ = harness.connect()
    missing = [name for name in commands.COMMANDS_BY_NAME if server.locator.locateResponder(name) is None]
    assert missing == []


def test_unknown_command_closes_only_that_connection(harness):
    client, server, pump = harness.connect()
    other, other_server, other_pump = harness.connect()
    authenticate(harness, other, other_pump)

    class Bogus(amp.Command):
        commandName = b"NoSuchCommand"

    client.protocol.callRemote(Bogus).addErrback(lambda f: None)
    pump.flush()
    assert closed(server)
    assert not closed(other_server)
    assert harness.call(other_pump, other.ping("ok")) == "ok"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\x00\x00",  # a key longer than AMP allows
        b"\x00\x03abc\x00\x01x\x00\x00",  # a box with neither command nor answer
        b"\x00\x07_answer\x00\x0299\x00\x00",  # an answer to nothing
        bytes(range(256)) * 4,
    ],
)
def test_garbage_closes_only_that_connection(harness, garbage):
    _, server, pump = harness.connect()
    other, other_server, other_pump = harness.connect()
    server.dataReceived(garbage)
    pump.flush()
    assert closed(server)
    assert not closed(other_server)
    authenticate(harness, other, other_pump)
    assert harness.call(other_pump, other.ping("ok")) == "ok"


def test_agent_pings_managers_and_drops_silent_ones(harness):
    client, server, pump = harness.connect()
    authenticate(harness, client, pump)  # else the authentication deadline closes it first
    # A live manager answers the agent's pings, so it stays connected.
    for _ in range(10):
        harness.clock.advance(3.0)
        pump.flush()
    assert not closed(server)
    # A manager that stops answering is dropped after three intervals of silence.
    pump.client_io = None  # stop delivering
    silent = iosim.FakeTransport(server, isServer=True)
    server.transport = silent
    harness.clock.advance(9.1)
    assert silent.disconnecting


def test_command_latency_and_errors_are_counted(harness):
    client, _, pump = harness.connect()
    harness.call(pump, client.get_agent_info())
    text = harness.state.metrics.render().decode()
    assert 'bai_agent_amp_command_seconds_count{command="GetAgentInfo"} 1.0' in text
    assert 'bai_agent_amp_command_errors_total{code="NOT_AUTHENTICATED",command="GetAgentInfo"} 1.0' in text
