"""RunnerLink on a task.Clock and a StringTransport; connect_runner on a real reactor."""

import json
import os
import struct

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from bai_agent.kernels.runner_link import (
    RunnerLink,
    RunnerProtocolError,
    RunnerUnavailable,
    connect_runner,
    split_output_frame,
)
from bai_agent.runner.framing import FrameDecoder, encode
from bai_agent.testing.deferreds import failure_of, result_of
from bai_agent.testing.waiting import sleep

pytestmark = pytest.mark.functional


HELLO = {
    "type": "hello",
    "protocol": 1,
    "runner_version": "1.0",
    "python": "3.11.2",
    "pid": 1,
    "features": ["query"],
    "active_run": None,
}


class Harness:
    def __init__(self, **options):
        self.clock = Clock()
        self.link = RunnerLink(self.clock, **options)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.decoder = FrameDecoder()
        self.received = []
        self.deaths = []
        self.link.dead.addCallback(self.deaths.append)

    def runner_says(self, *messages):
        self.link.dataReceived(b"".join(encode(m) for m in messages))

    def sent(self):
        """What the link wrote since the last call, decoded."""
        messages = self.decoder.feed(self.transport.value())
        self.transport.clear()
        return messages

    def handshake(self):
        ready = []
        self.link.ready.addCallback(ready.append)
        self.runner_says(HELLO)
        assert ready == [HELLO]
        assert self.sent() == [{"type": "hello", "protocol": 1}]


@pytest.fixture
def harness():
    return Harness(keepalive_interval=5.0, keepalive_timeout=15.0)


# -- handshake ------------------------------------------------------------------------------


def test_handshake_answers_hello_and_fires_ready(harness):
    harness.handshake()
    assert harness.link.hello == HELLO
    assert harness.link.alive
    assert harness.deaths == []


def test_hello_split_across_reads(harness):
    data = encode(HELLO)
    for i in range(len(data)):
        harness.link.dataReceived(data[i : i + 1])
    assert result_of(harness.link.ready) == HELLO


def test_protocol_mismatch_fails_ready_and_drops_the_link(harness):
    harness.runner_says(dict(HELLO, protocol=2))
    failure = failure_of(harness.link.ready)
    assert failure.check(RunnerProtocolError)
    assert "protocol 2" in failure.getErrorMessage()
    assert harness.transport.disconnecting
    assert harness.sent() == []  # no hello of ours to a runner we cannot speak with
    assert len(harness.deaths) == 1


def test_a_first_message_other_than_hello_is_a_protocol_error(harness):
    harness.runner_says({"type": "output", "run_id": "r", "stream": "stdout", "data": "x"})
    assert failure_of(harness.link.ready).check(RunnerProtocolError)
    assert harness.transport.disconnecting


def test_connection_lost_before_hello_fails_ready_as_unavailable(harness):
    harness.link.connectionLost(None)
    assert failure_of(harness.link.ready).check(RunnerUnavailable)
    assert harness.deaths == ["connection lost"]


# -- messages ---------------------------------------------------------------------------------


def test_messages_go_to_the_handler_and_early_ones_wait_for_it(harness):
    harness.handshake()
    output = {"type": "output", "run_id": "r", "stream": "stdout", "data": "a"}
    finished = {"type": "finished", "run_id": "r", "exit_code": 0}
    harness.runner_says(output)
    got = []
    harness.link.handler = got.append
    assert got == [RAW_A]
    harness.runner_says(finished)
    assert got == [RAW_A, finished]


def test_messages_right_after_hello_reach_a_handler_set_when_ready_fires(harness):
    got = []

    def on_ready(hello):
        harness.link.handler = got.append

    harness.link.ready.addCallback(on_ready)
    output = {"type": "output", "run_id": "r", "stream": "stdout", "data": "a"}
    harness.runner_says(HELLO, output)
    assert got == [RAW_A]


# Output frames reach the owner still JSON-escaped (split_output_frame).
RAW_A = {"type": "output-raw", "run_id": "r", "stream": "stdout", "raw": b"a"}


@pytest.mark.parametrize(
    "text",
    ["plain", "", 'quote " and backslash \\', "ends with backslash \\", "tab\t nl\n é ☃ 🐍", "\x00\x1f"],
)
def test_output_frames_are_split_without_decoding_and_stay_valid_json(text):
    payload = encode({"type": "output", "run_id": "run-1", "stream": "stderr", "data": text})[4:]
    split = split_output_frame(payload)
    assert (split["run_id"], split["stream"]) == ("run-1", "stderr")
    assert json.loads(b'"' + split["raw"] + b'"') == text


def test_other_frames_and_other_shapes_take_the_ordinary_path():
    for message in (
        {"type": "finished", "run_id": "r", "exit_code": 0},
        {"run_id": "r", "type": "output", "stream": "stdout", "data": "x"},  # other key order
        {"type": "output", "run_id": "r", "stream": "other", "data": "x"},
    ):
        assert split_output_frame(encode(message)[4:]) is None


def test_a_failing_handler_does_not_drop_the_link(harness):
    harness.handshake()
    got = []

    def handler(message):
        got.append(message)
        raise ValueError("owner bug")

    harness.link.handler = handler
    harness.runner_says({"type": "finished", "run_id": "a", "exit_code": 0})
    harness.runner_says({"type": "finished", "run_id": "b", "exit_code": 0})
    assert [m["run_id"] for m in got] == ["a", "b"]
    assert harness.link.alive
    assert harness.deaths == []


def test_send_frames_a_message(harness):
    harness.handshake()
    harness.link.send({"type": "execute", "run_id": "r", "mode": "query", "code": "1"})
    assert harness.sent() == [{"type": "execute", "run_id": "r", "mode": "query", "code": "1"}]


def test_send_on_a_dead_link_raises(harness):
    harness.handshake()
    harness.link.close()
    with pytest.raises(RunnerUnavailable):
        harness.link.send({"type": "ping", "id": 1})


def test_an_oversize_frame_drops_the_link(harness):
    harness.handshake()
    harness.link.dataReceived(struct.pack(">I", 8 * 1024 * 1024 + 1))
    assert harness.transport.disconnecting
    assert len(harness.deaths) == 1
    assert "bad frame" in harness.deaths[0]


def test_a_malformed_frame_drops_the_link_after_the_good_ones(harness):
    harness.handshake()
    got = []
    harness.link.handler = got.append
    good = {"type": "finished", "run_id": "r", "exit_code": 0}
    harness.link.dataReceived(encode(good) + struct.pack(">I", 3) + b"{{{")
    assert got == [good]
    assert harness.transport.disconnecting
    assert "bad frame" in harness.deaths[0]


def test_a_smaller_frame_limit_is_honoured():
    h = Harness(max_frame=1024)
    h.handshake()
    h.runner_says({"type": "output", "data": "x" * 2000})
    assert h.transport.disconnecting


# -- keepalive ----------------------------------------------------------------------------------


def test_pings_every_interval(harness):
    harness.handshake()
    harness.clock.advance(5)
    assert harness.sent() == [{"type": "ping", "id": 1}]
    harness.runner_says({"type": "pong", "id": 1})
    harness.clock.advance(5)
    assert harness.sent() == [{"type": "ping", "id": 2}]
    assert harness.deaths == []


def test_no_pong_within_the_timeout_declares_the_link_dead(harness):
    harness.handshake()
    harness.clock.advance(5)
    harness.clock.advance(5)
    assert harness.deaths == []
    harness.clock.advance(5)  # 15 s without a word
    assert len(harness.deaths) == 1
    assert "keepalive timeout" in harness.deaths[0]
    assert harness.transport.disconnecting
    assert not harness.link.alive
    assert harness.clock.getDelayedCalls() == []


def test_pongs_keep_the_link_alive(harness):
    harness.handshake()
    for _ in range(10):
        harness.clock.advance(5)
        [ping] = harness.sent()
        harness.runner_says({"type": "pong", "id": ping["id"]})
    assert harness.deaths == []


def test_any_frame_counts_as_a_sign_of_life(harness):
    harness.handshake()
    harness.link.handler = lambda message: None
    for _ in range(10):
        harness.clock.advance(5)
        harness.runner_says({"type": "output", "run_id": "r", "stream": "stdout", "data": "busy"})
    assert harness.deaths == []


def test_a_paused_link_is_not_declared_dead(harness):
    harness.handshake()
    harness.link.pauseProducing()
    assert harness.transport.producerState == "paused"
    harness.clock.advance(60)
    assert harness.deaths == []
    harness.link.resumeProducing()
    assert harness.transport.producerState == "producing"
    harness.clock.advance(10)
    assert harness.deaths == []
    harness.clock.advance(5)
    assert len(harness.deaths) == 1


def test_stop_producing_passes_through(harness):
    harness.link.stopProducing()
    assert harness.transport.producerState == "stopped"


def test_connection_lost_fires_dead_once(harness):
    harness.handshake()
    harness.link.connectionLost(None)
    harness.link.connectionLost(None)
    assert harness.deaths == ["connection lost"]
    assert harness.clock.getDelayedCalls() == []


# -- requests ----------------------------------------------------------------------------------


def test_completions_are_matched_by_id(harness):
    harness.handshake()
    first = harness.link.request_completions("os.pa", {"line": "os.pa"})
    second = harness.link.request_completions("pri")
    requests = harness.sent()
    assert requests == [
        {"type": "complete", "id": 1, "text": "os.pa", "options": {"line": "os.pa"}},
        {"type": "complete", "id": 2, "text": "pri", "options": {}},
    ]
    harness.runner_says({"type": "completions", "id": 2, "items": ["print"]})
    harness.runner_says({"type": "completions", "id": 1, "items": ["os.path", "os.pardir"]})
    harness.runner_says({"type": "completions", "id": 99, "items": ["stray"]})
    assert result_of(first) == ["os.path", "os.pardir"]
    assert result_of(second) == ["print"]
    assert harness.clock.getDelayedCalls()[0].func == harness.link._keepalive  # timeouts cancelled
    assert len(harness.clock.getDelayedCalls()) == 1


def test_completions_time_out_to_an_empty_list(harness):
    harness.handshake()
    d = harness.link.request_completions("os.pa", timeout=2.0)
    harness.clock.advance(2.0)
    assert result_of(d) == []
    harness.runner_says({"type": "completions", "id": 1, "items": ["late"]})  # ignored


def test_completions_on_a_dead_link_are_empty(harness):
    harness.handshake()
    d = harness.link.request_completions("x")
    harness.link.connectionLost(None)
    assert result_of(d) == []
    assert result_of(harness.link.request_completions("y")) == []


def test_interrupt_result(harness):
    harness.handshake()
    d = harness.link.interrupt()
    assert harness.sent() == [{"type": "interrupt", "id": 1}]
    harness.runner_says({"type": "interrupt-result", "ok": True, "id": 1})
    assert result_of(d) is True
    d = harness.link.interrupt(timeout=1.0)
    harness.clock.advance(1.0)
    assert result_of(d) is False


# -- connect_runner -----------------------------------------------------------------------------


class _FakeRunner(Protocol):
    def connectionMade(self):
        self.transport.write(encode(self.factory.hello))


def _listen(reactor, path, hello):
    factory = Factory.forProtocol(_FakeRunner)
    factory.hello = hello
    return reactor.listenUNIX(path, factory)


@pytest_twisted.inlineCallbacks
def test_connect_runner_retries_until_the_runner_listens(reactor, socket_dir):
    path = os.path.join(socket_dir, "runner.sock")
    ports = []
    reactor.callLater(0.4, lambda: ports.append(_listen(reactor, path, HELLO)))
    try:
        link = yield connect_runner(reactor, path, reactor, timeout=5)
        assert link.hello == HELLO
        link.close()
        yield sleep(reactor, 0)
    finally:
        for port in ports:
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_connect_runner_gives_up_after_the_timeout(reactor, socket_dir):
    started = reactor.seconds()
    with pytest.raises(RunnerUnavailable, match="no runner at"):
        yield connect_runner(reactor, os.path.join(socket_dir, "absent.sock"), reactor, timeout=0.5)
    assert 0.3 <= reactor.seconds() - started < 2.0


@pytest_twisted.inlineCallbacks
def test_connect_runner_fails_at_once_on_a_protocol_mismatch(reactor, socket_dir):
    path = os.path.join(socket_dir, "runner.sock")
    port = _listen(reactor, path, dict(HELLO, protocol=9))
    try:
        with pytest.raises(RunnerProtocolError):
            yield connect_runner(reactor, path, reactor, timeout=5)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_connect_runner_times_out_on_a_silent_listener(reactor, socket_dir):
    path = os.path.join(socket_dir, "runner.sock")
    factory = Factory.forProtocol(Protocol)  # accepts, never says hello
    port = reactor.listenUNIX(path, factory)
    try:
        with pytest.raises(RunnerUnavailable):
            yield connect_runner(reactor, path, reactor, timeout=0.5)
    finally:
        yield port.stopListening()


def test_connect_runner_can_be_cancelled():
    reactor = MemoryReactorClock()
    d = connect_runner(reactor, "/nonexistent/runner.sock", reactor, timeout=30)
    assert len(reactor.unixClients) == 1
    d.cancel()
    assert failure_of(d).check(CancelledError)
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []


def test_cancelling_between_two_attempts_leaves_no_unhandled_error():
    # At stop, a reconnection waiting to retry was cancelled; the failed attempt's link was
    # then closed, and its never-awaited ``ready`` logged "Unhandled error in Deferred".
    import gc

    from twisted.logger import globalLogPublisher

    reactor = MemoryReactorClock()
    d = connect_runner(reactor, "/run/x.sock", reactor, timeout=30)
    path, factory, timeout = reactor.unixClients[-1][:3]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectError("refused")))
    assert [c for c in reactor.getDelayedCalls() if c.active()]  # a retry is waiting
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        d.cancel()
        assert failure_of(d).check(CancelledError)
        assert [c for c in reactor.getDelayedCalls() if c.active()] == []
        del d, factory
        reactor.unixClients.clear()
        reactor.connectors.clear()
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [event.get("log_format") for event in logged if event.get("isError") or event.get("log_failure")] == []


def test_connect_runner_retries_on_the_injected_clock():
    reactor = MemoryReactorClock()
    d = connect_runner(reactor, "/run/x.sock", reactor, timeout=1.0)
    delays = []
    for _attempt in range(200):
        if d.called:
            break
        path, factory, timeout = reactor.unixClients[-1][:3]
        assert path == "/run/x.sock"
        connector = reactor.connectors[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectError("refused")))
        pending = [c for c in reactor.getDelayedCalls() if c.active()]
        if pending:
            delays.append(round(pending[-1].getTime() - reactor.seconds(), 3))
            reactor.advance(pending[-1].getTime() - reactor.seconds())
    assert delays[:4] == [0.005, 0.008, 0.011, 0.017]
    assert max(delays) <= 0.05
    assert failure_of(d).check(RunnerUnavailable)
    assert reactor.seconds() <= 1.0
