"""
The fake's container controls and the details the contract suite leaves to it: event
sequences and fields, injected failures, the OOM race, waiting and cancelling.
"""

import pytest
from twisted.internet.defer import CancelledError

from bai_agent.docker.interface import (
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
)
from bai_agent.testing.deferreds import error_of, result_of
from bai_agent.testing.docker_contract import KERNEL_LABELS, SLEEP_CMD
from bai_agent.testing.fake_docker import FakeDockerBackend

IMAGE = "bai-kernel/python:3.11"

#: The top-level fields of a container event from Docker 20.10.
EVENT_FIELDS = {"status", "id", "from", "Type", "Action", "Actor", "scope", "time", "timeNano"}


@pytest.fixture
def fake():
    backend = FakeDockerBackend()
    backend.add_image(IMAGE, KERNEL_LABELS)
    return backend


@pytest.fixture
def events(fake):
    received = []
    fake.stream_events(received.append, filters={"type": ["container"]})
    return received


def config(**extra):
    body = {
        "Image": IMAGE,
        "Cmd": SLEEP_CMD,
        "Labels": {"ai.backend.kernel-id": "k1"},
        "HostConfig": {"NetworkMode": "none"},
    }
    body.update(extra)
    return body


def running(fake, name="k1"):
    container_id = result_of(fake.create_container(name, config()))
    result_of(fake.start_container(container_id))
    return container_id


def actions(events):
    return [e["Action"] for e in events]


# -- events --------------------------------------------------------------------------


def test_a_container_event_has_the_daemons_fields(fake, events):
    container_id = result_of(fake.create_container("k1", config()))
    [event] = events
    assert set(event) == EVENT_FIELDS
    assert (event["Type"], event["Action"], event["status"]) == ("container", "create", "create")
    assert event["id"] == event["Actor"]["ID"] == container_id
    assert event["from"] == IMAGE
    assert event["scope"] == "local"
    assert event["timeNano"] == event["time"] * 10**9
    # Like the daemon: the image's labels, the container's, its name and image.
    assert event["Actor"]["Attributes"] == dict(
        KERNEL_LABELS, **{"ai.backend.kernel-id": "k1", "name": "k1", "image": IMAGE}
    )


def test_events_are_in_order_with_increasing_times(fake, events):
    container_id = running(fake)
    result_of(fake.kill_container(container_id))
    result_of(fake.remove_container(container_id))
    assert actions(events) == ["create", "start", "kill", "die", "destroy"]
    times = [e["timeNano"] for e in events]
    assert times == sorted(times) and len(set(times)) == len(times)


def test_start_emits_start_once(fake, events):
    container_id = running(fake)
    result_of(fake.start_container(container_id))  # already running: the daemon's 304
    assert actions(events) == ["create", "start"]


def test_sigkill_exits_137_after_a_kill_event_naming_the_signal(fake, events):
    container_id = running(fake)
    result_of(fake.kill_container(container_id))
    kill, die = events[-2:]
    assert (kill["Action"], kill["Actor"]["Attributes"]["signal"]) == ("kill", "9")
    assert (die["Action"], die["Actor"]["Attributes"]["exitCode"]) == ("die", "137")
    state = result_of(fake.inspect_container(container_id))["State"]
    assert (state["Status"], state["ExitCode"], state["Pid"]) == ("exited", 137, 0)


@pytest.mark.parametrize(
    "signal, exit_code", [("SIGTERM", 143), ("TERM", 143), ("15", 143), (2, 130), ("sigquit", 131)]
)
def test_a_fatal_signal_exits_128_plus_its_number(fake, signal, exit_code):
    container_id = running(fake)
    result_of(fake.kill_container(container_id, signal=signal))
    assert result_of(fake.wait_container(container_id)) == exit_code


def test_a_harmless_signal_leaves_the_container_running(fake, events):
    container_id = running(fake)
    result_of(fake.kill_container(container_id, signal="SIGWINCH"))
    assert actions(events)[-1] == "kill"
    assert fake.container_status(container_id) == "running"


def test_stop_emits_kill_die_stop(fake, events):
    container_id = running(fake)
    result_of(fake.stop_container(container_id))
    assert actions(events)[-3:] == ["kill", "die", "stop"]
    assert events[-3]["Actor"]["Attributes"]["signal"] == "15"


def test_force_removal_of_a_running_container_kills_it_first(fake, events):
    container_id = running(fake)
    waiting = fake.wait_container(container_id)
    result_of(fake.remove_container(container_id))
    assert actions(events)[-3:] == ["kill", "die", "destroy"]
    assert result_of(waiting) == 137
    assert fake.container_status(container_id) is None


def test_event_streams_filter_by_label(fake):
    mine, anyone = [], []
    fake.stream_events(mine.append, filters={"label": ["ai.backend.kernel-id=k2"]})
    fake.stream_events(anyone.append, filters={"label": ["ai.backend.kernel-id"]})
    result_of(fake.create_container("k1", config()))
    result_of(fake.create_container("k2", config(Labels={"ai.backend.kernel-id": "k2"})))
    assert [e["Actor"]["Attributes"]["name"] for e in mine] == ["k2"]
    assert [e["Actor"]["Attributes"]["name"] for e in anyone] == ["k1", "k2"]


# -- die, and the OOM race --------------------------------------------------------------


def test_die_emits_die_with_the_exit_code_and_fires_waiters(fake, events):
    container_id = running(fake)
    waiting = fake.wait_container(container_id)
    assert not waiting.called
    fake.die(container_id, 3)
    assert result_of(waiting) == 3
    assert events[-1]["Action"] == "die"
    assert events[-1]["Actor"]["Attributes"]["exitCode"] == "3"
    assert result_of(fake.wait_container(container_id)) == 3  # exited: at once


def test_oom_emits_oom_then_die_and_inspect_shows_it(fake, events):
    container_id = running(fake)
    fake.die(container_id, 137, oom=True)
    assert actions(events)[-2:] == ["oom", "die"]
    state = result_of(fake.inspect_container(container_id))["State"]
    assert (state["OOMKilled"], state["ExitCode"]) == (True, 137)


def test_a_late_oom_event_leaves_oomkilled_false(fake, events):
    container_id = running(fake)
    fake.die(container_id, 137, oom=True, oom_event="after")
    assert actions(events)[-2:] == ["die", "oom"]
    assert result_of(fake.inspect_container(container_id))["State"]["OOMKilled"] is False


def test_a_missing_oom_event_leaves_only_the_exit_code(fake, events):
    container_id = running(fake)
    fake.die(container_id, 137, oom=True, oom_event="missing")
    assert "oom" not in actions(events)
    state = result_of(fake.inspect_container(container_id))["State"]
    assert (state["OOMKilled"], state["ExitCode"]) == (False, 137)


def test_restarting_clears_oomkilled(fake):
    container_id = running(fake)
    fake.die(container_id, 137, oom=True)
    result_of(fake.start_container(container_id))
    state = result_of(fake.inspect_container(container_id))["State"]
    assert (state["Running"], state["OOMKilled"], state["ExitCode"]) == (True, False, 0)


def test_die_of_a_container_that_is_not_running_is_a_test_mistake(fake):
    container_id = result_of(fake.create_container("k1", config()))
    with pytest.raises(ValueError, match="not running"):
        fake.die(container_id, 0)
    with pytest.raises(ValueError, match="oom_event"):
        fake.die(container_id, 0, oom=True, oom_event="sometimes")


def test_on_start_runs_the_commands_behaviour_after_the_start_event(fake, events):
    def print_and_exit(container_id):
        assert actions(events)[-1] == "start"
        fake.set_logs(container_id, "a\nb\nc\n")
        fake.die(container_id, 0)

    fake.on_start(["echo"], print_and_exit)
    container_id = result_of(fake.create_container("k1", config(Cmd=["echo"])))
    result_of(fake.start_container(container_id))
    assert actions(events) == ["create", "start", "die"]
    assert result_of(fake.container_logs(container_id)) == "a\nb\nc\n"
    assert result_of(fake.container_logs(container_id, tail=2)) == "b\nc\n"
    assert result_of(fake.container_logs(container_id, tail=0)) == ""
    error_of(fake.container_logs(container_id, tail=-1), DockerError)


# -- waiting -------------------------------------------------------------------------------


def test_cancelling_a_wait_forgets_it(fake):
    container_id = running(fake)
    waiting = fake.wait_container(container_id)
    waiting.cancel()
    error_of(waiting, CancelledError)
    fake.die(container_id, 0)  # firing the cancelled waiter again would raise


# -- injected failures -----------------------------------------------------------------


def test_fail_next_fails_one_call_without_effect(fake, events):
    fake.fail_next("create_container", DockerUnavailable("create: timed out"))
    error = error_of(fake.create_container("k1", config()), DockerUnavailable)
    assert error.message == "create: timed out"
    assert fake.container_status("k1") is None
    assert events == []
    container_id = result_of(fake.create_container("k1", config()))  # the next one works
    assert fake.container_status(container_id) == "created"


def test_fail_next_applied_does_the_work_then_loses_the_answer(fake):
    fake.fail_next("create_container", DockerUnavailable("lost"), applied=True)
    error_of(fake.create_container("k1", config()), DockerUnavailable)
    assert fake.container_status("k1") == "created"  # a leak for the caller to clean up
    listed = result_of(fake.list_containers(labels={"ai.backend.kernel-id": "k1"}))
    assert [c["Names"] for c in listed] == [["/k1"]]


def test_fail_next_queues_failures_in_order(fake):
    container_id = running(fake)
    fake.fail_next("remove_container", DockerConflict("removal in progress", status=409))
    fake.fail_next("remove_container", DockerError("disk on fire", status=500))
    error_of(fake.remove_container(container_id), DockerConflict)
    error = error_of(fake.remove_container(container_id), DockerError)
    assert error.status == 500
    assert fake.container_status(container_id) == "running"
    result_of(fake.remove_container(container_id))
    assert fake.container_status(container_id) is None


def test_fail_next_reaches_the_events_stream(fake):
    fake.fail_next("stream_events", DockerUnavailable("no events"))
    stream = fake.stream_events(lambda event: None)
    error_of(stream.done, DockerUnavailable)
    assert fake.open_streams == 0


def test_fail_next_refuses_what_is_not_a_backend_method(fake):
    with pytest.raises(ValueError, match="remove_contianer"):
        fake.fail_next("remove_contianer", DockerError("typo"))
    with pytest.raises(ValueError):
        fake.fail_next("api_version", DockerError("an attribute"))


def test_calls_are_recorded_with_the_container(fake):
    container_id = running(fake)
    result_of(fake.remove_container(container_id))
    assert fake.calls[-3:] == [
        ("create_container", "k1"),
        ("start_container", container_id),
        ("remove_container", container_id),
    ]


def test_a_daemon_gone_fails_container_calls_as_unavailable(fake):
    container_id = running(fake)
    fake.set_available(False)
    error_of(fake.kill_container(container_id), DockerUnavailable)
    assert fake.container_status(container_id) == "running"


# -- names and ids -------------------------------------------------------------------------


def test_a_container_is_found_by_id_prefix_and_by_name(fake):
    container_id = running(fake)
    assert len(container_id) == 64
    for ref in (container_id, container_id[:12], "k1", "/k1"):
        assert result_of(fake.inspect_container(ref))["Id"] == container_id
    error_of(fake.inspect_container("k"), DockerNotFound)


def test_without_a_name_the_daemon_picks_one(fake):
    container_id = result_of(fake.create_container(None, config()))
    name = result_of(fake.inspect_container(container_id))["Name"]
    assert name.startswith("/") and len(name) > 1


def test_the_config_is_copied_not_shared(fake):
    body = config()
    container_id = result_of(fake.create_container("k1", body))
    body["Labels"]["ai.backend.kernel-id"] = "changed"
    info = result_of(fake.inspect_container(container_id))
    assert info["Config"]["Labels"]["ai.backend.kernel-id"] == "k1"
    info["State"]["Running"] = "tampered"
    assert result_of(fake.inspect_container(container_id))["State"]["Running"] is False


def test_update_changes_host_config_and_emits_update(fake, events):
    container_id = running(fake)
    warnings = result_of(fake.update_container(container_id, {"Memory": 1 << 26}))
    assert warnings == []
    assert result_of(fake.inspect_container(container_id))["HostConfig"]["Memory"] == 1 << 26
    assert actions(events)[-1] == "update"
