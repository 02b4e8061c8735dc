"""DockerService on a task.Clock with the in-memory fake backend."""

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from bai_agent.docker.interface import DockerUnavailable
from bai_agent.docker.service import DockerService
from bai_agent.runtime.backoff import Backoff
from bai_agent.testing.fake_docker import FakeDockerBackend

KERNEL = {"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "python"}
RELIST = 1000.0  # far beyond the backoff delays, so that the two never mix


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def fake():
    return FakeDockerBackend()


def make_service(clock, backend, relist_interval=RELIST, random=lambda: 1.0):
    service = DockerService(clock, backend, relist_interval=relist_interval, random=random)
    service.setName("docker")
    return service


def pending_delays(clock):
    return sorted(round(call.getTime() - clock.seconds(), 6) for call in clock.getDelayedCalls())


def retry_delay(clock):
    """The delay of the one pending reconnection attempt."""
    [delay] = [d for d in pending_delays(clock) if d < RELIST / 2]
    return delay


def calls(backend, name):
    return [c for c in backend.calls if c[0] == name]


def test_start_connects_and_lists_kernel_images(clock, fake):
    fake.add_image("bai/python:3.11", KERNEL)
    fake.add_image("debian:12", {"maintainer": "x"})
    service = make_service(clock, fake)
    service.startService()
    assert service.healthy is True
    assert service.last_error is None
    assert (service.api_version, service.daemon_version) == ("1.41", "20.10.24")
    assert [image.name for image in service.images] == ["bai/python:3.11"]
    assert fake.open_streams == 1
    assert [c[0] for c in fake.calls[:3]] == ["negotiate", "ping", "stream_events"]


def test_backoff_doubles_up_to_30_seconds_while_unavailable(clock, fake):
    fake.set_available(False)
    service = make_service(clock, fake)
    service.startService()
    delays = []
    for _ in range(8):
        assert service.healthy is False
        assert "daemon gone" in service.last_error
        delays.append(retry_delay(clock))
        clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert len(calls(fake, "negotiate")) == 9


def test_jitter_shortens_delays_by_up_to_a_fifth(clock, fake):
    fake.set_available(False)
    service = make_service(clock, fake, random=lambda: 0.5)
    service.startService()
    delays = []
    for _ in range(3):
        delays.append(retry_delay(clock))
        clock.advance(delays[-1])
    assert delays == [0.9, 1.8, 3.6]
    assert Backoff(random=lambda: 0.999, initial=1, maximum=30).next_delay() > 0.8


def test_recovery_flips_healthy(clock, fake):
    fake.add_image("bai/python:3.11", KERNEL)
    fake.set_available(False)
    service = make_service(clock, fake)
    service.startService()
    clock.advance(retry_delay(clock))
    assert service.healthy is False and service.images == []
    fake.set_available(True)
    clock.advance(retry_delay(clock))
    assert service.healthy is True
    assert service.last_error is None
    assert [image.name for image in service.images] == ["bai/python:3.11"]
    assert fake.open_streams == 1
    assert pending_delays(clock) == [RELIST - 3]  # only the relist timer


def test_daemon_going_away_marks_unhealthy_until_it_is_back(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    fake.set_available(False)
    assert service.healthy is False
    assert "broke" in service.last_error
    clock.advance(retry_delay(clock))  # 1 s, still away
    assert service.healthy is False
    assert retry_delay(clock) == 2
    fake.set_available(True)
    clock.advance(2)
    assert service.healthy is True
    assert fake.open_streams == 1
    assert (len(calls(fake, "negotiate")), len(calls(fake, "ping"))) == (3, 2)


def test_stream_closed_by_the_daemon_is_reopened(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    fake.end_streams()
    assert service.healthy is False
    assert service.last_error == "the events stream was closed"
    assert fake.open_streams == 0
    clock.advance(retry_delay(clock))
    assert service.healthy is True
    assert fake.open_streams == 1


def test_a_flapping_stream_backs_off_and_a_stable_one_resets(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    delays = []
    for _ in range(3):
        fake.end_streams()  # ends at once, every time
        delays.append(retry_delay(clock))
        clock.advance(delays[-1])
    assert delays == [1, 2, 4]
    clock.advance(DockerService.STABLE_STREAM_SECONDS)
    fake.end_streams()
    assert retry_delay(clock) == 1


def test_image_events_refresh_the_images(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    assert service.images == []
    fake.add_image("bai/python:3.11", KERNEL)
    assert [image.name for image in service.images] == ["bai/python:3.11"]
    fake.tag_image("bai/python:3.11", "bai/python:latest")
    assert sorted(image.name for image in service.images) == ["bai/python:3.11", "bai/python:latest"]
    fake.delete_image("bai/python:3.11")
    fake.delete_image("bai/python:latest")
    assert service.images == []


def test_other_events_do_not_relist(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    before = len(calls(fake, "list_images"))
    fake.emit_event({"Type": "container", "Action": "start", "Actor": {"ID": "c1"}})
    assert len(calls(fake, "list_images")) == before


def test_images_are_relisted_periodically(clock, fake):
    service = make_service(clock, fake, relist_interval=30.0)
    service.startService()
    fake.add_image("bai/python:3.11", KERNEL, emit_events=False)
    clock.advance(29)
    assert service.images == []
    clock.advance(1)
    assert [image.name for image in service.images] == ["bai/python:3.11"]


def test_each_image_is_inspected_once_while_its_id_lasts(clock, fake):
    image_id = fake.add_image("bai/python:3.11", KERNEL)
    service = make_service(clock, fake, relist_interval=30.0)
    service.startService()
    fake.add_image("bai/python:latest", {}, image_id=image_id, emit_events=False)
    clock.advance(30)
    clock.advance(30)
    assert calls(fake, "inspect_image") == [("inspect_image", image_id)]
    assert sorted(image.name for image in service.images) == ["bai/python:3.11", "bai/python:latest"]


def test_a_failing_subscriber_does_not_stop_the_stream(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    received = []

    def broken(event):
        raise RuntimeError("subscriber bug")

    service.subscribe(broken)
    service.subscribe(received.append)
    service.subscribe(lambda event: fail(RuntimeError("async subscriber bug")))
    events = [{"Type": "container", "Action": "start"}, {"Type": "container", "Action": "die"}]
    for event in events:
        fake.emit_event(event)
    assert received == events
    assert service.healthy is True
    assert fake.open_streams == 1


def test_unsubscribe_stops_delivery(clock, fake):
    service = make_service(clock, fake)
    service.startService()
    received = []
    unsubscribe = service.subscribe(received.append)
    fake.emit_event({"Type": "container", "Action": "start"})
    unsubscribe()
    unsubscribe()  # harmless twice
    fake.emit_event({"Type": "container", "Action": "die"})
    assert [e["Action"] for e in received] == ["start"]


def test_stop_cancels_timers_and_stream_and_closes_the_backend(clock, fake):
    service = make_service(clock, fake, relist_interval=30.0)
    service.startService()
    assert clock.getDelayedCalls() != []
    stopped = service.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []
    assert fake.open_streams == 0
    assert fake.closed is True
    assert service.healthy is False


def test_stop_while_retrying_cancels_the_retry(clock, fake):
    fake.set_available(False)
    service = make_service(clock, fake)
    service.startService()
    clock.advance(1)
    service.stopService()
    assert clock.getDelayedCalls() == []
    attempts = len(calls(fake, "negotiate"))
    fake.set_available(True)
    clock.advance(100)
    assert len(calls(fake, "negotiate")) == attempts


class SlowListing(FakeDockerBackend):
    """``list_images`` answers only when the test fires the pending Deferred."""

    def __init__(self):
        super().__init__()
        self.pending = []

    def list_images(self):
        d = Deferred()
        self.pending.append((d, super().list_images()))
        return d

    def answer(self):
        d, answer = self.pending.pop(0)
        answer.chainDeferred(d)


def test_stop_waits_for_in_flight_work(clock):
    backend = SlowListing()
    service = make_service(clock, backend)
    service.startService()
    assert len(backend.pending) == 1
    stopped = service.stopService()
    assert not stopped.called
    assert backend.closed is False
    backend.answer()
    assert stopped.called
    assert backend.closed is True


def test_refreshes_requested_during_a_listing_coalesce_into_one(clock):
    backend = SlowListing()
    service = make_service(clock, backend)
    service.startService()
    backend.add_image("a:1", KERNEL)
    backend.add_image("b:1", KERNEL)
    assert len(backend.pending) == 1  # the start-up listing is still out
    backend.answer()
    assert len(backend.pending) == 1  # one more for both events
    backend.answer()
    assert backend.pending == []
    assert sorted(image.name for image in service.images) == ["a:1", "b:1"]


def test_refresh_images_fires_with_a_listing_newer_than_the_call(clock):
    backend = SlowListing()
    service = make_service(clock, backend)
    service.startService()
    backend.add_image("a:1", KERNEL, emit_events=False)
    waiter = service.refresh_images()
    backend.answer()  # the listing that started before the call
    assert not waiter.called
    backend.answer()
    assert [image.name for image in waiter.result] == ["a:1"]


class ListingUnavailableOnce(FakeDockerBackend):
    def __init__(self):
        super().__init__()
        self.fail_listing = False

    def list_images(self):
        if self.fail_listing:
            self.fail_listing = False
            self.calls.append(("list_images", None))
            return fail(DockerUnavailable("GET /images/json: connection refused"))
        return super().list_images()


def test_a_listing_that_finds_the_daemon_gone_reconnects(clock):
    backend = ListingUnavailableOnce()
    service = make_service(clock, backend, relist_interval=30.0)
    service.startService()
    backend.fail_listing = True
    clock.advance(30)
    assert service.healthy is False
    assert "connection refused" in service.last_error
    assert backend.open_streams == 0  # dropped, to be reopened with the reconnection
    clock.advance(1)
    assert service.healthy is True
    assert backend.open_streams == 1
