"""
Fuzzing a real agent process over real TCP: random bytes, broken framing, half-open and
many connections at its AMP port, and fuzzed commands from an authenticated connection,
while a well-behaved manager keeps calling it. The agent must keep serving that manager,
stay healthy and log no unhandled error.
"""

import json
import random

import pytest
import pytest_twisted
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols import amp

from bai_agent.protocol import commands
from bai_agent.protocol.auth import compute_mac
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import sleep
from tests import amp_strategies as boxes
from tests.functional.agent_process import containers_of, running_agent

pytestmark = pytest.mark.functional

AGENT_ID = "agent-fz"
KNOWN_KERNELS = ("fz1",)
#: Signs in the agent's log that something escaped its error handling.
BAD_LOG_LINES = ("Unhandled Error", "Unhandled error in Deferred", "failed unexpectedly")


def our_containers():
    return containers_of(AGENT_ID)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, etcd_server, docker_host):
    with running_agent(tmp_path_factory.mktemp("fuzz"), etcd_server.addr, AGENT_ID) as process:
        yield process


@pytest.fixture
def client(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = pytest_twisted.blockon(AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret))
    yield client
    pytest_twisted.blockon(client.reset())
    client.close()


def assert_agent_fine(agent):
    assert agent.process.poll() is None, f"the agent exited:\n{agent.log_text()[-3000:]}"
    status, body = agent.http("/healthz")
    assert status == 200, body
    log = agent.log_text()
    for line in BAD_LOG_LINES:
        assert line not in log, f"{line!r} in the agent log:\n{log[log.index(line) - 2000 : log.index(line) + 2000]}"


class Keeper:
    """A well-behaved manager that keeps calling the agent until told to stop."""

    def __init__(self, client):
        self.client = client
        self.calls = 0
        self.failures = []
        self.stopped = False

    @inlineCallbacks
    def run(self):
        while not self.stopped:
            for call in (lambda: self.client.ping("keep"), self.client.list_kernels, self.client.get_agent_info):
                try:
                    yield call()
                except Exception as e:
                    self.failures.append(repr(e))
                    if self.client.protocol.transport is None or self.client.disconnected.called:
                        return
                self.calls += 1


# -- garbage at the port -------------------------------------------------------------------


class Garbage(Protocol):
    """Writes ``pieces`` one by one (``pause`` s apart), then ends the way ``ending`` says."""

    def __init__(self, reactor, pieces, ending, pause=0.0):
        self.reactor = reactor
        self.pieces = list(pieces)
        self.ending = ending
        self.pause = pause
        self.done = Deferred()
        self.received = 0

    def connectionMade(self):
        self._next()

    def _next(self):
        if self.transport is None or self.done.called:
            return
        if self.pieces:
            self.transport.write(self.pieces.pop(0))
            self.reactor.callLater(self.pause, self._next)
            return
        if self.ending == "close":
            self.transport.loseConnection()
        elif self.ending == "abort":
            self.transport.abortConnection()
        elif self.ending == "half-close":
            self.transport.loseWriteConnection()  # the agent sees EOF; we still read
        # "hold": stay open (the agent drops it as silent, or the test closes it)

    def dataReceived(self, data):
        self.received += len(data)

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.ending)

    def close(self):
        if self.transport is not None and not self.done.called:
            self.transport.abortConnection()


def frame(key: bytes, value_length: int, value: bytes) -> bytes:
    """One AMP key/value pair whose value length prefix may lie about the value."""
    return len(key).to_bytes(2, "big") + key + value_length.to_bytes(2, "big") + value


def garbage_plans(rng: random.Random):
    """(pieces, ending, pause) for each garbage connection: every kind, several times."""
    endings = ["close", "abort", "half-close", "hold"]

    def random_bytes(size):
        return rng.randbytes(size)

    kinds = [
        lambda: [random_bytes(rng.randint(1, 100_000))],
        lambda: [b"\xff\xff" * rng.randint(1, 2000)],  # key lengths of 0xffff (AMP allows 255)
        lambda: [frame(b"_command", 0xFFFF, b"Ping")],  # a value shorter than its prefix says
        lambda: [
            frame(b"_command", 4, b"Ping") + frame(b"_ask", 1, b"1") + frame(b"payload", 0xFFFF, random_bytes(0xFFFF))
        ],
        lambda: [
            frame(b"_command", 5, b"Hello")
            + frame(b"_ask", 1, b"1")
            + b"\x00\x00" * 1
            + random_bytes(rng.randint(1, 500))
        ],
        lambda: [
            frame(random_bytes(rng.randint(1, 255)), 0xFFFF, random_bytes(0xFFFF)) for _ in range(rng.randint(1, 20))
        ],
        lambda: [b"\x00\x00" * rng.randint(1, 1000)],  # empty boxes
        lambda: (
            [frame(b"_command", 4, b"Ping") + frame(b"_ask", 2, b"x1") + frame(b"payload", 1, b"\xff") + b"\x00\x00"]
            * 50
        ),
        lambda: [frame(b"_answer", 3, b"999") + b"\x00\x00"],  # an answer to nothing
        lambda: [frame(b"_error", 1, b"7") + frame(b"_error_code", 3, b"BAD") + b"\x00\x00"],
        lambda: [bytes([byte]) for byte in frame(b"_command", 5, b"Hello")[:-2]],  # slow, byte by byte
        lambda: [],  # connect and say nothing
        lambda: [serialise_hello(i) for i in range(200)],  # a flood of valid boxes, answers unread
    ]
    plans = []
    for round_ in range(3):
        for index, kind in enumerate(kinds):
            pause = 0.05 if index == 10 else 0.0
            plans.append((kind(), endings[(index + round_) % len(endings)], pause))
    rng.shuffle(plans)
    return plans


def serialise_hello(tag):
    return boxes.serialise({amp.COMMAND: b"Hello", amp.ASK: str(tag).encode()})


@pytest_twisted.inlineCallbacks
def test_garbage_from_many_sockets_leaves_the_agent_serving_everyone_else(agent, client, reactor):
    keeper = Keeper(client)
    keeping = keeper.run()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.amp_port)
    rng = random.Random(20240607)
    plans = garbage_plans(rng)
    connections = []
    # All at once: some forty connections open together, in two waves.
    for wave in (plans[: len(plans) // 2], plans[len(plans) // 2 :]):
        protocols = [Garbage(reactor, pieces, ending, pause) for pieces, ending, pause in wave]
        yield DeferredList([connectProtocol(endpoint, protocol) for protocol in protocols], consumeErrors=True)
        connections += protocols
        yield sleep(reactor, 1.0)
    # The agent drops what stays silent after three heartbeats (1 s each here).
    yield sleep(reactor, 4.0)
    still_open = [protocol for protocol in connections if not protocol.done.called]
    for protocol in still_open:
        protocol.close()
    # Each garbage connection was closed by the agent (bad bytes, or silence), or by us.
    assert [protocol.ending for protocol in still_open] == [], "the agent kept garbage connections open"
    yield DeferredList([protocol.done for protocol in connections], consumeErrors=True)
    keeper.stopped = True
    yield keeping
    assert keeper.failures == []
    assert keeper.calls > 30
    assert not client.disconnected.called
    assert (yield client.ping("after")) == "after"
    yield deferToThread(assert_agent_fine, agent)


# -- fuzzed commands over TCP --------------------------------------------------------------


class RawConnection:
    def __init__(self, reactor, manager, protocol):
        self.reactor = reactor
        self.manager = manager
        self.protocol = protocol

    @classmethod
    @inlineCallbacks
    def open(cls, reactor, agent):
        manager = boxes.RawManager()
        protocol = amp.BinaryBoxProtocol(manager)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", agent.amp_port), protocol)
        connection = cls(reactor, manager, protocol)
        hello = yield connection.call({amp.COMMAND: b"Hello"})
        secret = agent.secret_path.read_text().strip()
        answer = yield connection.call(
            {amp.COMMAND: b"Authenticate", b"mac": compute_mac(secret, hello[b"nonce"]).encode()}
        )
        assert amp.ANSWER in answer, answer
        return connection

    def call(self, box, timeout=60.0):
        """The answer box, or None when the connection was lost first."""
        d = Deferred()
        self.manager.when_answered(self.manager.send(box), d.callback)
        return d.addTimeout(timeout, self.reactor)

    def close(self):
        self.protocol.transport.loseConnection()


def bounded(box):
    """
    The same box, with an Execute's ``flush_timeout`` kept short: the real agent waits
    that long in real time, and the point here is the answer, not the wait.
    """
    if box.get(amp.COMMAND) != commands.Execute.commandName or b"options" not in box:
        return box
    try:
        options = json.loads(box[b"options"])
    except ValueError:
        return box
    if isinstance(options, dict):
        flush = options.get("flush_timeout")
        if isinstance(flush, (int, float)) and not isinstance(flush, bool) and flush > 1:
            options["flush_timeout"] = 0.5
            box = {**box, b"options": json.dumps(options).encode()}
    elif box.get(b"kernel_id") in (kernel_id.encode() for kernel_id in KNOWN_KERNELS):
        box = {key: value for key, value in box.items() if key != b"options"}
    return box


@pytest_twisted.inlineCallbacks
def test_fuzzed_commands_over_tcp_are_answered_by_the_contract(agent, client, reactor):
    drawn = boxes.draw_examples(boxes.any_command_box(kernel_ids=st.sampled_from(KNOWN_KERNELS)), 150, seed_value=7)
    connection = yield RawConnection.open(reactor, agent)
    try:
        for box in drawn:
            kernels = yield client.list_kernels()
            if not any(kernel["kernel_id"] == "fz1" for kernel in kernels):
                yield client.create_kernel("fz1", boxes.IMAGE, {"cpu": 0.5, "mem": "128m"})
            box = bounded(box)
            command = commands.COMMANDS_BY_NAME[box[amp.COMMAND]]
            answer = yield connection.call(box)
            shown = {key: value[:80] for key, value in box.items()}
            assert answer is not None and not connection.manager.lost, f"the agent dropped the connection on {shown}"
            problem = boxes.answer_problem(command, answer)
            assert problem is None, f"{problem}\n  for {shown}"
            pong = yield connection.call({amp.COMMAND: b"Ping", b"payload": b"alive"})
            assert pong is not None and pong.get(b"payload") == b"alive", f"Ping failed after {shown}"
    finally:
        connection.close()
        yield client.reset()
    yield deferToThread(assert_agent_fine, agent)
    assert our_containers() == []
