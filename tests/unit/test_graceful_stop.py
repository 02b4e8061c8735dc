"""The graceful part of a stop (bai_agent.stopping) and what the AMP server does meanwhile."""

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from bai_agent.protocol import errors
from bai_agent.runtime.inflight import InFlight
from bai_agent.stopping import GracefulStop, StopFlag, within
from tests.unit.test_rpc_server import Harness, authenticate, failure_type


@attrs.define
class StubFeed:
    caught_up: bool = False


@attrs.define
class StubTransport:
    closed: bool = False

    def loseConnection(self):
        self.closed = True


@attrs.define(eq=False)
class StubConnection:
    feed: object = None
    transport: StubTransport = attrs.Factory(StubTransport)


class StubKernels:
    running = True

    def __init__(self):
        self.destroyed_with = None
        self.destroying = Deferred()
        self.announced = 0

    def count(self):
        return 2

    def destroy_all(self, reason):
        self.destroyed_with = reason
        return self.destroying

    def announce_stopping(self):
        self.announced += 1


class StubEtcd:
    def __init__(self):
        self.refreshes = 0

    def refresh_now(self):
        self.refreshes += 1
        return succeed(None)


class StubState:
    """The parts a graceful stop works on: the stop flag, the AMP sessions, kernels, etcd, notes."""

    def __init__(self):
        self.stop_flag = StopFlag()
        self.commands_in_flight = InFlight()
        self.connections = set()
        self.kernels = StubKernels()
        self.etcd = StubEtcd()
        self.notes = []

    def note(self, text):
        self.notes.append(text)

    @property
    def stopping(self):
        return self.stop_flag.requested


class StubPort:
    def __init__(self):
        self.stopped = False

    def stopListening(self):
        self.stopped = True


@pytest.fixture
def clock():
    return Clock()


def run(clock, state, grace=10.0, destroy=False):
    stop = GracefulStop(
        clock, state.stop_flag, state, state.kernels, state.etcd.refresh_now, state.note, grace, destroy
    )
    stop.amp_port = StubPort()
    results = []
    stop.run().addBoth(results.append)
    return stop, results


def test_stop_stops_listening_marks_stopping_and_waits_for_commands_in_flight(clock):
    state = StubState()
    command = Deferred()
    state.commands_in_flight.track(command)
    stop, results = run(clock, state)
    assert state.stopping and stop.amp_port.stopped
    assert state.etcd.refreshes == 1  # the record says "stopping" at once
    clock.advance(5)
    assert results == [] and state.kernels.announced == 0
    command.callback({"status": "finished"})
    assert state.kernels.announced == 1
    assert results == [None]


def test_commands_still_running_after_the_grace_period_are_not_waited_for(clock):
    state = StubState()
    command = Deferred()
    state.commands_in_flight.track(command)
    connection = StubConnection()
    state.connections.add(connection)
    _, results = run(clock, state, grace=3.0)
    clock.advance(2.9)
    assert results == []
    clock.advance(0.1)
    assert results == [None]
    assert connection.transport.closed
    assert not command.called  # never cancelled: the work goes on without a waiter


def test_agent_stopping_waits_for_subscribers_to_acknowledge(clock):
    state = StubState()
    feed = StubFeed(caught_up=False)
    subscriber = StubConnection(feed=feed)
    state.connections.add(subscriber)
    _, results = run(clock, state)
    assert state.kernels.announced == 1
    clock.advance(1.0)
    assert results == [] and not subscriber.transport.closed
    feed.caught_up = True
    clock.advance(0.05)
    assert results == [None] and subscriber.transport.closed


def test_a_subscriber_that_never_acknowledges_does_not_hold_the_stop(clock):
    state = StubState()
    state.connections.add(StubConnection(feed=StubFeed(caught_up=False)))
    _, results = run(clock, state)
    clock.advance(10)
    assert results == [None]
    assert clock.getDelayedCalls() == []


def test_kernels_keep_running_by_default(clock):
    state = StubState()
    run(clock, state)
    assert state.kernels.destroyed_with is None


def test_destroy_kernels_on_stop_destroys_them_before_agent_stopping(clock):
    state = StubState()
    _, results = run(clock, state, destroy=True)
    assert state.kernels.destroyed_with == "agent-stopping"
    assert state.kernels.announced == 0
    state.kernels.destroying.callback(2)
    assert state.kernels.announced == 1
    assert results == [None]


def test_a_second_stop_does_nothing(clock):
    state = StubState()
    run(clock, state)
    _, results = run(clock, state)
    assert results == [None]
    assert state.kernels.announced == 1


def test_within_reports_whether_the_work_finished_in_time(clock):
    work = Deferred()
    results = []
    within(clock, work, 1.0).addBoth(results.append)
    clock.advance(1.0)
    assert results == [False]
    late = Deferred()
    within(clock, late, 1.0).addBoth(results.append)
    late.errback(RuntimeError("failed, but finished"))
    assert results == [False, True]
    assert clock.getDelayedCalls() == []


# -- the AMP server while stopping ---------------------------------------------------


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


def test_while_stopping_new_commands_are_refused_but_ping_answers(harness):
    client, _, pump = harness.connect()
    authenticate(harness, client, pump)
    harness.state.stopping.requested = True
    assert failure_type(harness.call(pump, client.get_agent_info())) is errors.BackendUnavailable
    assert harness.call(pump, client.ping("still there")) == "still there"


def test_while_stopping_new_connections_are_closed(harness):
    harness.state.stopping.requested = True
    assert harness.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)) is None
