"""InFlight: what a service waits for before it says it has stopped."""

from twisted.internet.defer import Deferred, succeed

from bai_agent.runtime.inflight import InFlight


def test_tracked_deferreds_are_forgotten_when_they_fire_and_keep_their_results():
    in_flight = InFlight()
    d = in_flight.track(Deferred())
    assert len(in_flight) == 1
    d.callback("answer")
    assert len(in_flight) == 0
    assert d.result == "answer"


def test_settled_fires_after_all_even_when_some_fail():
    in_flight = InFlight()
    one, two = in_flight.track(Deferred()), in_flight.track(Deferred())
    settled = in_flight.settled()
    one.errback(RuntimeError("failed"))
    assert not settled.called
    two.callback(None)
    assert settled.called and settled.result is None
    failures = []
    one.addErrback(failures.append)  # the failure is still there for its own caller
    assert failures and failures[0].check(RuntimeError)


def test_settled_with_nothing_in_flight_fires_at_once():
    in_flight = InFlight()
    in_flight.track(succeed(1))
    assert not in_flight
    assert in_flight.settled().called
