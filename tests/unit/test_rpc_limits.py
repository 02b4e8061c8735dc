"""
The connection limits of the AMP server (bai_agent.rpc.limits, PROTOCOL.md section 6):
box size and keys before and after authentication, reading paused while answers wait,
the authentication deadline, the cap on waiting connections, secret rotation, and the
rate of the log lines a stranger can cause.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure

from bai_agent.config import AgentConfig
from bai_agent.protocol.auth import compute_mac
from bai_agent.rpc.limits import (
    AUTHENTICATED,
    AUTHENTICATION_DEADLINE,
    BIG_DATA_CHUNKS,
    MAX_BIG_DATA,
    UNAUTHENTICATED,
    WaitingRoom,
)
from bai_agent.rpc.server import HANG_UP_GRACE
from bai_agent.runtime.lograte import BURST, PERIOD
from tests.agent_parts import AgentParts, StubDocker, StubEtcd

SECRET = "5e" * 32
NEW_SECRET = "a7" * 32


class Connection:
    """One manager connection to the agent, on a StringTransport: boxes in, boxes out."""

    def __init__(self, factory, port):
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self._tags = iter(range(1, 1 << 30))

    def send(self, items: dict, ask=True) -> bytes:
        tag = str(next(self._tags)).encode()
        box = dict(items, _ask=tag) if ask else dict(items)
        self.server.dataReceived(serialise(box))
        return tag

    def answers(self) -> list:
        boxes = [dict(box) for box in amp.parseString(self.transport.value())]
        self.transport.clear()
        return boxes

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def hello(self) -> bytes:
        self.send({b"_command": b"Hello"})
        (answer,) = self.answers()
        return answer[b"nonce"]

    def authenticate(self, secret=SECRET):
        nonce = self.hello()
        self.send({b"_command": b"Authenticate", b"mac": compute_mac(secret, nonce).encode()})
        (answer,) = self.answers()
        return answer

    def lose(self):
        self.server.connectionLost(Failure(ConnectionDone()))


def serialise(box: dict) -> bytes:
    return amp.AmpBox(
        {key if isinstance(key, bytes) else key.encode(): value for key, value in box.items()}
    ).serialize()


class Harness:
    def __init__(self, tmp_path, max_waiting=256, **config):
        self.clock = Clock()
        # No pings or silence in the way of these tests.
        etcd = StubEtcd(secret=SECRET, heartbeat_interval=1000.0)
        self.state = AgentParts(self.clock, tmp_path, etcd=etcd, docker=StubDocker(images=[]), **config)
        self.factory = self.state.amp_factory(max_waiting=max_waiting)
        self._ports = iter(range(5000, 65000))

    def connect(self) -> Connection:
        return Connection(self.factory, next(self._ports))


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


def ping_of_size(size: int, extra_keys=0) -> dict:
    """A Ping box that takes exactly ``size`` bytes on the wire with its ``_ask`` of ``b"1"``."""
    box = {b"_command": b"Ping", b"_ask": b"1"}
    for index in range(extra_keys):
        box[b"x.%d" % index] = b""
    base = len(serialise(dict(box, payload=b"")))
    box[b"payload"] = b"p" * (size - base)
    assert len(serialise(box)) == size
    return box


def big_ping(size: int) -> dict:
    """A Ping box of exactly ``size`` bytes, most of them in Big-style chunks (``data``, ``data.1``, ...)."""
    box = {b"_command": b"Ping", b"_ask": b"1", b"payload": b"big"}
    remaining = size - len(serialise(box))
    index = 0
    while remaining > 0:
        key = b"data" if index == 0 else b"data.%d" % index
        overhead = 4 + len(key)
        value = min(0xFFFF, remaining - overhead)
        assert value >= 0
        box[key] = b"d" * value
        remaining -= overhead + value
        index += 1
    assert len(serialise(box)) == size
    return box


# -- box size and keys ------------------------------------------------------------------


def test_the_limits_are_those_of_the_protocol():
    assert UNAUTHENTICATED.max_bytes == 4096
    assert BIG_DATA_CHUNKS == 17  # 1 MiB in chunks of 65,535 bytes
    assert AUTHENTICATED.max_bytes == MAX_BIG_DATA + 2 * 65536
    assert AUTHENTICATED.max_keys == 64 + 17


def test_a_box_at_the_unauthenticated_limit_is_answered_and_one_byte_more_closes(harness):
    connection = harness.connect()
    connection.server.dataReceived(serialise(ping_of_size(UNAUTHENTICATED.max_bytes)))
    (answer,) = connection.answers()
    assert answer[b"_error_code"] == b"NOT_AUTHENTICATED"
    assert not connection.closed
    connection.server.dataReceived(serialise(ping_of_size(UNAUTHENTICATED.max_bytes + 1)))
    assert connection.answers() == []
    assert connection.aborted


def test_an_unfinished_box_never_buffers_past_the_bound(harness):
    connection = harness.connect()
    server = connection.server
    endless = b"".join(b"\x00\x02k%d\x00\x10" % (index % 10) + b"v" * 16 for index in range(2000))
    for offset in range(0, len(endless), 7):
        server.dataReceived(endless[offset : offset + 7])
        assert server._box_bytes + len(server._unprocessed) <= UNAUTHENTICATED.max_bytes
        if connection.aborted:
            break
    assert connection.aborted
    assert offset < UNAUTHENTICATED.max_bytes
    # What it held is let go at once, not when the connection is finally gone.
    assert server._currentBox is None and server._unprocessed == b""


def test_a_read_of_many_small_boxes_past_the_bound_is_all_answered(harness):
    connection = harness.connect()
    data = b"".join(serialise({b"_command": b"Hello", b"_ask": b"%d" % tag}) for tag in range(1, 401))
    assert len(data) > 2 * UNAUTHENTICATED.max_bytes
    connection.server.dataReceived(data)
    answers = connection.answers()
    assert [answer[b"_answer"] for answer in answers] == [b"%d" % tag for tag in range(1, 401)]
    assert not connection.closed


def test_a_box_of_too_many_keys_closes_before_authentication(harness):
    connection = harness.connect()
    connection.server.dataReceived(serialise(ping_of_size(200, extra_keys=UNAUTHENTICATED.max_keys - 3)))
    assert connection.answers() != [] and not connection.closed
    connection.server.dataReceived(serialise(ping_of_size(200, extra_keys=UNAUTHENTICATED.max_keys - 2)))
    assert connection.answers() == [] and connection.aborted


def test_an_authenticated_connection_may_send_a_mebibyte_of_big_data_and_no_more(harness):
    connection = harness.connect()
    assert b"_answer" in connection.authenticate()
    connection.server.dataReceived(serialise(big_ping(AUTHENTICATED.max_bytes)))
    (answer,) = connection.answers()
    assert answer[b"payload"] == b"big"
    assert not connection.closed
    connection.server.dataReceived(serialise(big_ping(AUTHENTICATED.max_bytes + 1)))
    assert connection.answers() == [] and connection.aborted


def test_an_authenticated_box_may_have_the_protocols_keys_and_no_more(harness):
    connection = harness.connect()
    connection.authenticate()
    connection.server.dataReceived(serialise(ping_of_size(2000, extra_keys=AUTHENTICATED.max_keys - 3)))
    assert connection.answers() != [] and not connection.closed
    connection.server.dataReceived(serialise(ping_of_size(2000, extra_keys=AUTHENTICATED.max_keys - 2)))
    assert connection.aborted


def test_the_largest_legitimate_upload_fits_the_authenticated_limit(harness):
    from bai_agent.protocol import commands

    box = commands.UploadFile.makeArguments(
        {"kernel_id": "k" * 64, "path": "p" * 4096, "data": b"\xff" * MAX_BIG_DATA, "append": True}, None
    )
    box[b"_command"], box[b"_ask"] = commands.UploadFile.commandName, b"99999"
    assert len(serialise(box)) <= AUTHENTICATED.max_bytes
    assert len(box) <= AUTHENTICATED.max_keys


# -- reading paused while answers wait ---------------------------------------------------


def test_the_agent_reads_no_further_while_its_answers_wait(harness):
    connection = harness.connect()
    assert connection.transport.producer is connection.server
    # What the transport does when the answers waiting to be written fill its buffer:
    connection.server.pauseProducing()
    assert connection.transport.producerState == "paused"
    connection.server.dataReceived(
        b"".join(serialise({b"_command": b"Hello", b"_ask": b"%d" % tag}) for tag in range(1, 11))
    )
    assert connection.answers() == []
    connection.server.resumeProducing()  # the answers drained
    assert connection.transport.producerState == "producing"
    assert len(connection.answers()) == 10


def test_a_paused_connection_that_is_closing_releases_its_transport(harness):
    connection = harness.connect()
    connection.server.pauseProducing()
    connection.transport.loseConnection()
    connection.server.resumeProducing()
    # Else a transport with a paused producer would never finish its close.
    assert connection.transport.producer is None


# -- the authentication deadline ----------------------------------------------------------


def test_an_unauthenticated_connection_is_closed_at_the_deadline_whatever_it_sends(harness):
    connection = harness.connect()
    for _second in range(int(AUTHENTICATION_DEADLINE) - 1):
        connection.hello()
        harness.clock.advance(1.0)
        assert not connection.closed
    harness.clock.advance(1.0)
    assert connection.aborted


def test_an_authenticated_connection_outlives_the_deadline(harness):
    connection = harness.connect()
    connection.authenticate()
    harness.clock.advance(AUTHENTICATION_DEADLINE * 10)
    assert not connection.closed
    assert not [call for call in harness.clock.getDelayedCalls() if "overdue" in repr(call)]


def test_the_deadline_comes_from_the_config(tmp_path):
    harness = Harness(tmp_path, authentication_deadline=1.5)
    connection = harness.connect()
    harness.clock.advance(1.4)
    assert not connection.closed
    harness.clock.advance(0.1)
    assert connection.aborted


def test_the_config_refuses_a_deadline_that_is_not_positive(tmp_path):
    assert AgentConfig().authentication_deadline == AUTHENTICATION_DEADLINE
    for deadline in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            AgentConfig(authentication_deadline=deadline)


# -- the cap on waiting connections --------------------------------------------------------


def test_past_the_cap_the_oldest_waiting_connection_is_closed(tmp_path):
    harness = Harness(tmp_path, max_waiting=3)
    first, second, third = harness.connect(), harness.connect(), harness.connect()
    assert not any(connection.closed for connection in (first, second, third))
    fourth = harness.connect()
    assert first.aborted
    assert not any(connection.closed for connection in (second, third, fourth))
    # The newest can still authenticate: a manager's fresh connection gets in.
    assert b"_answer" in fourth.authenticate()


def test_authenticated_connections_never_count_against_the_cap(tmp_path):
    harness = Harness(tmp_path, max_waiting=2)
    managers = []
    for _ in range(5):
        managers.append(harness.connect())
        managers[-1].authenticate()
    waiting = [harness.connect() for _ in range(3)]
    assert waiting[0].aborted and not waiting[1].closed and not waiting[2].closed
    assert not any(manager.closed for manager in managers)


def test_a_connection_that_closes_leaves_the_waiting_room(tmp_path):
    harness = Harness(tmp_path, max_waiting=2)
    first, second = harness.connect(), harness.connect()
    second.lose()
    third = harness.connect()
    assert not first.closed and not third.closed
    assert len(harness.factory.waiting) == 2


def test_the_waiting_room_keeps_age_order():
    room = WaitingRoom(2)
    assert room.enter("a") == [] and room.enter("b") == []
    assert room.enter("c") == ["a"]
    room.leave("b")
    assert room.enter("d") == []
    assert room.enter("e") == ["c"]
    assert "d" in room and "e" in room and len(room) == 2
    with pytest.raises(ValueError):
        WaitingRoom(0)


# -- secret rotation ----------------------------------------------------------------------


def test_a_secret_change_closes_the_sessions_of_the_old_secret(harness):
    old_sessions = [harness.connect(), harness.connect()]
    for connection in old_sessions:
        connection.authenticate()
    waiting = harness.connect()
    harness.state.etcd.secret = NEW_SECRET
    harness.factory.secret_changed(NEW_SECRET)
    assert all(connection.closed for connection in old_sessions)
    assert not waiting.closed  # it may still authenticate, with the new secret
    # Commands already on their way are no longer taken from a closed session.
    old_sessions[0].send({b"_command": b"GetAgentInfo"})
    (answer,) = old_sessions[0].answers()
    assert answer[b"_error_code"] == b"NOT_AUTHENTICATED"
    # A peer that does not read is cut off after the grace period.
    harness.clock.advance(HANG_UP_GRACE)
    assert all(connection.aborted for connection in old_sessions)
    assert b"_answer" in waiting.authenticate(NEW_SECRET)
    assert harness.connect().authenticate(SECRET)[b"_error_code"] == b"AUTH_FAILED"


def test_a_session_of_the_new_secret_stays_open_when_it_is_announced(harness):
    harness.state.etcd.secret = NEW_SECRET
    connection = harness.connect()
    connection.authenticate(NEW_SECRET)
    harness.factory.secret_changed(NEW_SECRET)
    assert not connection.closed


# -- log rate ---------------------------------------------------------------------------


def test_failed_authentications_are_logged_at_a_bounded_rate(harness):
    with capturedLogs() as events:
        for _ in range(100):
            connection = harness.connect()
            connection.authenticate("00" * 32)
        failed = [event for event in events if "failed to authenticate" in event["log_format"]]
        assert len(failed) == BURST
        harness.clock.advance(PERIOD)
        summaries = [event for event in events if "suppressed" in event["log_format"]]
        assert [(event["count"], event["kind"]) for event in summaries] == [(100 - BURST, "failed authentication")]
        assert not any(SECRET in str(event) for event in events)


def test_connections_closed_for_bad_bytes_are_logged_at_a_bounded_rate(harness):
    with capturedLogs() as events:
        for _ in range(50):
            harness.connect().server.dataReceived(serialise({b"_command": b"NoSuchCommand", b"_ask": b"1"}))
        closing = [event for event in events if event["log_format"].startswith("closing connection from")]
        assert len(closing) == BURST
