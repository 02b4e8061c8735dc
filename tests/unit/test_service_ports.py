"""The host-port pool on a task.Clock: allocation, cool-down, take-over, binding failures."""

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from bai_agent.services.ports import PortPool, PortsExhausted, PortTaken
from bai_agent.testing.deferreds import failure_of, result_of


def pool(low=30000, high=30003, cooldown=30.0):
    clock = Clock()
    return clock, PortPool(clock, low, high, cooldown=cooldown)


def test_allocate_hands_out_distinct_ports_of_the_range():
    _, ports = pool()
    got = [ports.allocate("k1") for _ in range(4)]
    assert sorted(got) == [30000, 30001, 30002, 30003]
    assert ports.owned_by("k1") == [30000, 30001, 30002, 30003]
    assert ports.in_use == 4


def test_exhausted_range_is_a_clear_error():
    _, ports = pool(high=30001)
    ports.allocate("a")
    ports.allocate("b")
    with pytest.raises(PortsExhausted, match="30000..30001"):
        ports.allocate("c")


def test_released_port_cools_down_before_reuse():
    clock, ports = pool(high=30000)
    port = ports.allocate("k1")
    assert ports.release(port) is True
    assert ports.owner_of(port) is None
    with pytest.raises(PortsExhausted):
        ports.allocate("k2")
    clock.advance(29.9)
    with pytest.raises(PortsExhausted):
        ports.allocate("k2")
    clock.advance(0.1)
    assert ports.allocate("k2") == port
    assert ports.owner_of(port) == "k2"


def test_zero_cooldown_reuses_at_once():
    _, ports = pool(high=30000, cooldown=0)
    ports.release(ports.allocate("a"))
    assert ports.allocate("b") == 30000


def test_allocation_is_round_robin():
    clock, ports = pool()
    first = ports.allocate("a")
    ports.release(first)
    clock.advance(60)
    # the port released and cooled is still not the next one handed out
    assert ports.allocate("b") == first + 1
    assert ports.allocate("c") == first + 2
    assert ports.allocate("d") == first + 3
    assert ports.allocate("e") == first  # wraps around


def test_release_of_a_free_port_does_nothing():
    _, ports = pool()
    assert ports.release(30000) is False
    assert ports.allocate("a") == 30000  # and did not start a cool-down


def test_owned_by_and_release_owner():
    _, ports = pool()
    a1 = ports.allocate("a")
    b1 = ports.allocate("b")
    a2 = ports.allocate("a")
    assert ports.owned_by("a") == [a1, a2]
    assert ports.owned_by("nobody") == []
    assert ports.release_owner("a") == [a1, a2]
    assert ports.owned_by("a") == []
    assert ports.owned_by("b") == [b1]


def test_owners_may_be_tuples():
    _, ports = pool()
    port = ports.allocate(("kernel-1", "jupyter"))
    assert ports.owned_by(("kernel-1", "jupyter")) == [port]


def test_reserve_reclaims_a_known_port():
    _, ports = pool()
    ports.reserve(30002, "k1")
    assert ports.owner_of(30002) == "k1"
    ports.reserve(30002, "k1")  # the same owner again: nothing changes
    assert [ports.allocate("k2") for _ in range(3)] == [30000, 30001, 30003]


def test_reserve_of_a_held_port_is_an_error():
    _, ports = pool()
    port = ports.allocate("k1")
    with pytest.raises(PortTaken, match=f"port {port} is already in use"):
        ports.reserve(port, "k2")
    assert ports.owner_of(port) == "k1"


def test_reserve_of_a_cooling_port_is_an_error():
    clock, ports = pool()
    ports.release(ports.allocate("k1"))
    with pytest.raises(PortTaken, match="released less than 30s ago"):
        ports.reserve(30000, "k2")
    clock.advance(30)
    ports.reserve(30000, "k2")


def test_reserve_outside_the_range_is_kept_but_never_allocated():
    _, ports = pool(high=30000)
    ports.reserve(40000, "k1")
    assert ports.owned_by("k1") == [40000]
    assert ports.allocate("k2") == 30000
    assert ports.release(40000) is True
    with pytest.raises(ValueError):
        ports.reserve(70000, "k1")


@pytest.mark.parametrize("low, high", [(0, 10), (10, 9), (1, 65536)])
def test_bad_range_is_refused(low, high):
    with pytest.raises(ValueError):
        PortPool(Clock(), low, high)


def test_negative_cooldown_is_refused():
    with pytest.raises(ValueError):
        PortPool(Clock(), 1, 2, cooldown=-1)


def test_allocate_bound_skips_ports_held_outside_the_agent():
    _, ports = pool()
    tried = []

    def bind(port):
        tried.append(port)
        if port < 30002:
            return fail(CannotListenError("", port, OSError("in use")))
        return succeed(f"listening on {port}")

    assert result_of(ports.allocate_bound("k1", bind)) == (30002, "listening on 30002")
    assert tried == [30000, 30001, 30002]
    assert ports.owned_by("k1") == [30002]
    assert ports.is_cooling(30000) and ports.is_cooling(30001)


def test_allocate_bound_gives_up_when_no_port_binds():
    _, ports = pool()
    tried = []

    def bind(port):
        tried.append(port)
        return fail(CannotListenError("", port, OSError("in use")))

    failure_of(ports.allocate_bound("k1", bind), PortsExhausted)
    assert tried == [30000, 30001, 30002, 30003]
    assert ports.in_use == 0


def test_allocate_bound_releases_on_other_errors():
    _, ports = pool()
    failure_of(ports.allocate_bound("k1", lambda port: fail(RuntimeError("boom"))), RuntimeError)
    assert ports.in_use == 0


def test_allocate_bound_with_everything_in_use():
    _, ports = pool(high=30000)
    ports.allocate("other")
    failure_of(ports.allocate_bound("k1", lambda port: succeed(None)), PortsExhausted)
