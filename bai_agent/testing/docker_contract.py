"""
One contract test suite for every ``IDockerBackend`` (flocker's
``make_idockerclient_tests``): run on the fake in unit tests and on the real daemon in
functional tests, so that the fake stays true to the daemon.

Usage::

    class TestFakeDockerContract(make_docker_backend_tests(make_fake_fixture)):
        pass

``fixture_factory(request)`` gets the pytest ``request`` (for other fixtures and
finalizers) and returns an object with:

- ``backend``: the ``IDockerBackend`` under test;
- ``add_image(name, labels) -> image id``: create a local image (blocking is fine);
- ``tag_image(source, target)`` and ``remove_image(name)``: as ``docker tag``/``rmi``;
- ``unreachable_backend()``: a backend of the same kind whose daemon is away;
- ``settle(seconds) -> Deferred``: let the backend's I/O happen (a fake fires at once);
- ``unique_name()``: a fresh ``repo:tag`` that nothing else uses;
- ``kernel_image``: the name of an image whose containers can run ``/usr/bin/python3``;
- ``container_name()``: a fresh container name (``bai-test-...``); the factory removes
  every container of a name it gave out when the test ends.

Containers run the commands below (``SLEEP_CMD``, ``PRINT_CMD``, ``OOM_CMD``) with
``NetworkMode: none``; a fake backend must make ``PRINT_CMD`` write ``out\n`` to stdout
then ``err\n`` to stderr and exit 0, and ``OOM_CMD`` run out of memory (exit 137).

The factory cleans up after itself (``request.addfinalizer``).
"""

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface.verify import verifyObject

from bai_agent.docker.engine import MIN_API_VERSION, api_version_key
from bai_agent.docker.images import kernel_image_from_inspect
from bai_agent.docker.interface import (
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
    IDockerBackend,
    IEventStream,
)

KERNEL_LABELS = {
    "ai.backend.kernelspec": "1",
    "ai.backend.runtime-type": "python",
    "ai.backend.features": "query batch",
    "ai.backend.resource.min.mem": "64m",
}


PYTHON = "/usr/bin/python3"

#: Runs for a minute (the tests end it sooner).
SLEEP_CMD = [PYTHON, "-c", "import time; time.sleep(60)"]

#: Writes "out\n" to stdout, then "err\n" to stderr, and exits 0.
PRINT_CMD = [
    PYTHON,
    "-c",
    # The pause: Docker reads stdout and stderr from two pipes, so output written close
    # together may be logged in either order (a flaky test found it).
    "import sys, time; print('out'); sys.stdout.flush(); time.sleep(0.3); print('err', file=sys.stderr)",
]

#: Writes 200 MB (every page touched) and says so if it survives.
OOM_CMD = [PYTHON, "-c", "x = b'\\x01' * (200 * 1024 * 1024); print('survived')"]

MiB = 1024 * 1024

#: The label that marks a test's containers (its value: the test's first container name).
RUN_LABEL = "bai-test.run"


def container_config(docker, cmd, labels=None, host_config=None, **config):
    """A create body for ``docker.kernel_image`` running ``cmd``, never on a network."""
    body = {
        "Image": docker.kernel_image,
        "Cmd": list(cmd),
        "Labels": dict(labels or {}),
        "HostConfig": dict(host_config or {}, NetworkMode="none"),
    }
    body.update(config)
    return body


@inlineCallbacks
def _eventually(docker, predicate, seconds=20.0, step=0.1):
    """Let I/O happen until ``predicate()`` is true; fail after ``seconds``."""
    for _ in range(int(seconds / step)):
        if predicate():
            return
        yield docker.settle(step)
    assert predicate(), f"not true within {seconds}s"


@inlineCallbacks
def watch_container(docker, container_id):
    """
    Open an events stream for the container's events and make sure it is open before
    returning ``(events, stream)``: the stream gives no signal that it is, so update
    the container (a harmless change that emits an ``update`` event) until one arrives.
    """
    events: list[dict[str, Any]] = []
    stream = docker.backend.stream_events(events.append, filters={"type": ["container"], "container": [container_id]})
    for attempt in range(40):
        yield docker.backend.update_container(container_id, {"CpuShares": 1024 + attempt})
        yield docker.settle(0.1)
        if any(e.get("Action") == "update" for e in events):
            return events, stream
    stream.cancel()
    raise AssertionError(f"the events stream delivered no update event: {events!r}")


def _actions(events):
    return [e.get("Action") for e in events]


def _expect_failure(d, error_type):
    """A Deferred firing with the failure's exception; it fails if ``d`` did not fail so."""
    result: Deferred[Any] = Deferred()

    def succeeded(value):
        result.errback(AssertionError(f"expected {error_type.__name__}, got result {value!r}"))

    def failed(failure):
        if failure.check(error_type):
            result.callback(failure.value)
        else:
            result.errback(failure)

    d.addCallbacks(succeeded, failed)
    return result


def make_docker_backend_tests(fixture_factory):
    """A pytest test class checking the ``IDockerBackend`` contract; subclass it as ``Test...``."""

    class DockerBackendContract:
        @pytest.fixture
        def docker(self, request):
            return fixture_factory(request)

        def test_provides_interface(self, docker):
            assert verifyObject(IDockerBackend, docker.backend)

        @pytest_twisted.inlineCallbacks
        def test_negotiate_picks_a_supported_version(self, docker):
            version = yield docker.backend.negotiate()
            assert isinstance(version, dict)
            assert version["ApiVersion"]
            assert api_version_key(docker.backend.api_version) >= api_version_key(MIN_API_VERSION)
            assert api_version_key(docker.backend.api_version) <= api_version_key(version["ApiVersion"])

        @pytest_twisted.inlineCallbacks
        def test_ping_answers(self, docker):
            result = yield docker.backend.ping()
            assert result is None

        @pytest_twisted.inlineCallbacks
        def test_list_images_shows_a_new_image_with_its_labels(self, docker):
            name = docker.unique_name()
            image_id = docker.add_image(name, KERNEL_LABELS)
            summaries = yield docker.backend.list_images()
            [summary] = [s for s in summaries if name in (s.get("RepoTags") or ())]
            assert summary["Id"] == image_id
            assert KERNEL_LABELS.items() <= (summary.get("Labels") or {}).items()

        @pytest_twisted.inlineCallbacks
        def test_inspect_image_by_name_and_id(self, docker):
            name = docker.unique_name()
            image_id = docker.add_image(name, KERNEL_LABELS)
            by_name = yield docker.backend.inspect_image(name)
            by_id = yield docker.backend.inspect_image(image_id)
            assert by_name["Id"] == by_id["Id"] == image_id
            assert image_id.startswith("sha256:")
            assert by_name["RepoTags"] == [name]
            assert KERNEL_LABELS.items() <= by_name["Config"]["Labels"].items()
            image = kernel_image_from_inspect(name, by_name)
            assert image is not None
            assert (image.name, image.id, image.features, image.min_mem) == (
                name,
                image_id,
                ("query", "batch"),
                64 * 1024**2,
            )

        @pytest_twisted.inlineCallbacks
        def test_inspect_missing_image_is_not_found(self, docker):
            error = yield _expect_failure(docker.backend.inspect_image(docker.unique_name()), DockerNotFound)
            assert error.status == 404
            assert error.message

        @pytest_twisted.inlineCallbacks
        def test_events_stream_delivers_image_events(self, docker):
            name = docker.unique_name()
            image_id = docker.add_image(name, KERNEL_LABELS)
            events: list[dict[str, Any]] = []
            stream = docker.backend.stream_events(events.append, filters={"type": ["image"]})
            assert verifyObject(IEventStream, stream)
            repo = name.rsplit(":", 1)[0]
            # The stream gives no signal that it is open: tag until an event arrives.
            for attempt in range(40):
                docker.tag_image(name, f"{repo}:event{attempt}")
                yield docker.settle(0.25)
                if any(e.get("Action") == "tag" and e["Actor"]["ID"] == image_id for e in events):
                    break
            assert not stream.done.called
            stream.cancel()
            yield stream.done
            tags = [e for e in events if e.get("Action") == "tag" and e["Actor"]["ID"] == image_id]
            assert tags, events
            assert all(e["Type"] == "image" for e in events)
            assert tags[-1]["Actor"]["Attributes"]["name"].startswith(f"{repo}:event")

        @pytest_twisted.inlineCallbacks
        def test_cancel_ends_the_stream(self, docker):
            name = docker.unique_name()
            docker.add_image(name, KERNEL_LABELS)
            events: list[dict[str, Any]] = []
            stream = docker.backend.stream_events(events.append, filters={"type": ["image"]})
            yield docker.settle(0.25)
            stream.cancel()
            result = yield stream.done
            assert result is None
            docker.tag_image(name, name.rsplit(":", 1)[0] + ":after-cancel")
            yield docker.settle(0.5)
            assert events == []
            stream.cancel()  # idempotent

        @pytest_twisted.inlineCallbacks
        def test_unreachable_daemon_fails_with_unavailable(self, docker):
            backend = docker.unreachable_backend()
            yield _expect_failure(backend.negotiate(), DockerUnavailable)
            yield _expect_failure(backend.ping(), DockerUnavailable)
            yield _expect_failure(backend.list_images(), DockerUnavailable)
            yield _expect_failure(backend.inspect_image("anything"), DockerUnavailable)
            yield _expect_failure(backend.create_container("bai-test-x", {"Image": "x"}), DockerUnavailable)
            for call in (
                backend.start_container,
                backend.inspect_container,
                backend.kill_container,
                backend.stop_container,
                backend.remove_container,
                backend.wait_container,
                backend.container_logs,
            ):
                yield _expect_failure(call("bai-test-x"), DockerUnavailable)
            yield _expect_failure(backend.list_containers(), DockerUnavailable)
            yield _expect_failure(backend.update_container("bai-test-x", {"CpuShares": 512}), DockerUnavailable)
            events: list[dict[str, Any]] = []
            stream = backend.stream_events(events.append)
            yield _expect_failure(stream.done, DockerUnavailable)
            assert events == []

        # -- containers -----------------------------------------------------------

        @pytest_twisted.inlineCallbacks
        def test_create_start_inspect_shows_a_running_container(self, docker):
            name = docker.container_name()
            labels = {RUN_LABEL: name, "ai.backend.kernel-id": "k1"}
            config = container_config(docker, SLEEP_CMD, labels, Env=["BAI_TEST=1"])
            container_id = yield docker.backend.create_container(name, config)
            created = yield docker.backend.inspect_container(container_id)
            assert created["Id"] == container_id
            assert (created["State"]["Status"], created["State"]["Running"]) == ("created", False)

            result = yield docker.backend.start_container(container_id)
            assert result is None
            yield docker.backend.start_container(name)  # already started: fine
            info = yield docker.backend.inspect_container(name)
            assert info["Id"] == container_id
            assert info["Name"] == "/" + name
            assert info["State"]["Running"] is True
            assert info["State"]["Status"] == "running"
            assert info["State"]["OOMKilled"] is False
            assert info["State"]["Pid"] > 0
            assert info["Config"]["Cmd"] == SLEEP_CMD
            assert "BAI_TEST=1" in info["Config"]["Env"]
            assert info["Config"]["Tty"] is False
            # The container's labels, on top of the image's.
            assert labels.items() <= info["Config"]["Labels"].items()
            assert info["Config"]["Labels"]["ai.backend.kernelspec"] == "1"
            assert info["HostConfig"]["NetworkMode"] == "none"
            image = yield docker.backend.inspect_image(docker.kernel_image)
            assert info["Image"] == image["Id"]

        @pytest_twisted.inlineCallbacks
        def test_create_from_a_missing_image_is_not_found(self, docker):
            config = container_config(docker, SLEEP_CMD, Image=docker.unique_name())
            error = yield _expect_failure(
                docker.backend.create_container(docker.container_name(), config), DockerNotFound
            )
            assert "No such image" in error.message

        @pytest_twisted.inlineCallbacks
        def test_create_with_an_invalid_name_is_a_docker_error(self, docker):
            config = container_config(docker, SLEEP_CMD)
            error = yield _expect_failure(docker.backend.create_container("bad/name", config), DockerError)
            assert error.status == 400
            assert "Invalid container name" in error.message

        @pytest_twisted.inlineCallbacks
        def test_list_containers_by_label_finds_them_and_no_others(self, docker):
            run = docker.container_name()
            mine = yield docker.backend.create_container(
                run, container_config(docker, SLEEP_CMD, {RUN_LABEL: run, "role": "mine"})
            )
            other = yield docker.backend.create_container(
                docker.container_name(),
                container_config(docker, SLEEP_CMD, {RUN_LABEL: run, "role": "other"}),
            )
            stranger = yield docker.backend.create_container(
                docker.container_name(), container_config(docker, SLEEP_CMD)
            )
            yield docker.backend.start_container(mine)

            found = yield docker.backend.list_containers(labels={RUN_LABEL: run, "role": "mine"})
            assert [c["Id"] for c in found] == [mine]
            [summary] = found
            assert summary["Names"] == ["/" + run]
            assert summary["State"] == "running"
            assert summary["Labels"]["role"] == "mine"

            both = yield docker.backend.list_containers(labels={RUN_LABEL: run})
            assert sorted(c["Id"] for c in both) == sorted([mine, other])
            present = yield docker.backend.list_containers(labels={RUN_LABEL: run, "role": None})
            assert sorted(c["Id"] for c in present) == sorted([mine, other])
            running = yield docker.backend.list_containers(labels={RUN_LABEL: run}, all=False)
            assert [c["Id"] for c in running] == [mine]
            everything = yield docker.backend.list_containers()
            assert {mine, other, stranger} <= {c["Id"] for c in everything}
            nobody = yield docker.backend.list_containers(labels={RUN_LABEL: run + "-none"})
            assert nobody == []

        @pytest_twisted.inlineCallbacks
        def test_kill_emits_die_with_exit_code_137_and_the_container_exits(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(
                name, container_config(docker, SLEEP_CMD, {RUN_LABEL: name})
            )
            yield docker.backend.start_container(container_id)
            events, stream = yield watch_container(docker, container_id)
            try:
                yield docker.backend.kill_container(container_id)
                yield _eventually(docker, lambda: "die" in _actions(events))
            finally:
                stream.cancel()
            actions = _actions(events)
            assert actions.index("kill") < actions.index("die")
            kill = events[actions.index("kill")]
            die = events[actions.index("die")]
            assert kill["Actor"]["Attributes"]["signal"] == "9"
            for event in (kill, die):
                assert event["Type"] == "container"
                assert event["status"] == event["Action"]
                assert event["id"] == event["Actor"]["ID"] == container_id
                assert event["from"] == docker.kernel_image
                assert isinstance(event["time"], int) and isinstance(event["timeNano"], int)
                attributes = event["Actor"]["Attributes"]
                assert attributes["name"] == name
                assert attributes["image"] == docker.kernel_image
                assert attributes[RUN_LABEL] == name
            assert die["Actor"]["Attributes"]["exitCode"] == "137"

            info = yield docker.backend.inspect_container(container_id)
            assert info["State"]["Status"] == "exited"
            assert info["State"]["Running"] is False
            assert info["State"]["ExitCode"] == 137
            assert info["State"]["OOMKilled"] is False
            exit_code = yield docker.backend.wait_container(container_id)
            assert exit_code == 137

        @pytest_twisted.inlineCallbacks
        def test_kill_of_a_container_that_is_not_running_conflicts(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            error = yield _expect_failure(docker.backend.kill_container(container_id), DockerConflict)
            assert error.status == 409
            assert "is not running" in error.message

        @pytest_twisted.inlineCallbacks
        def test_kill_with_an_unknown_signal_is_a_docker_error(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            yield docker.backend.start_container(container_id)
            error = yield _expect_failure(docker.backend.kill_container(container_id, signal="SIGNOPE"), DockerError)
            assert error.status == 400
            info = yield docker.backend.inspect_container(container_id)
            assert info["State"]["Running"] is True

        @pytest_twisted.inlineCallbacks
        def test_wait_fires_when_the_container_is_killed(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            never_started = yield docker.backend.wait_container(container_id)
            assert never_started == 0
            yield docker.backend.start_container(container_id)
            waiting = docker.backend.wait_container(container_id)
            yield docker.settle(0.2)
            assert not waiting.called
            yield docker.backend.kill_container(container_id, signal="SIGKILL")
            exit_code = yield waiting
            assert exit_code == 137

        @pytest_twisted.inlineCallbacks
        def test_stop_ends_a_running_container(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            yield docker.backend.start_container(container_id)
            result = yield docker.backend.stop_container(container_id, timeout=1)
            assert result is None
            info = yield docker.backend.inspect_container(container_id)
            assert info["State"]["Running"] is False
            assert info["State"]["ExitCode"] > 128  # died of a signal
            yield docker.backend.stop_container(container_id, timeout=1)  # stopped: fine

        @pytest_twisted.inlineCallbacks
        def test_create_with_a_name_in_use_conflicts(self, docker):
            name = docker.container_name()
            first = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            error = yield _expect_failure(
                docker.backend.create_container(name, container_config(docker, SLEEP_CMD)),
                DockerConflict,
            )
            assert error.status == 409
            assert "already in use" in error.message
            assert first in error.message
            listed = yield docker.backend.list_containers()
            assert sum(("/" + name) in c["Names"] for c in listed) == 1

        @pytest_twisted.inlineCallbacks
        def test_remove_forgets_the_container_and_frees_its_name(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(
                name, container_config(docker, SLEEP_CMD, {RUN_LABEL: name})
            )
            yield docker.backend.start_container(container_id)
            error = yield _expect_failure(docker.backend.remove_container(container_id, force=False), DockerConflict)
            assert "cannot remove a running container" in error.message

            result = yield docker.backend.remove_container(container_id)
            assert result is None
            error = yield _expect_failure(docker.backend.inspect_container(container_id), DockerNotFound)
            assert error.status == 404
            assert "No such container" in error.message
            listed = yield docker.backend.list_containers(labels={RUN_LABEL: name})
            assert listed == []
            again = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            assert again != container_id

        @pytest_twisted.inlineCallbacks
        def test_calls_on_a_missing_container_are_not_found(self, docker):
            missing = docker.container_name()  # never created
            error = yield _expect_failure(docker.backend.remove_container(missing), DockerNotFound)
            assert error.status == 404
            assert "No such container" in error.message
            for call in (
                docker.backend.start_container,
                docker.backend.inspect_container,
                docker.backend.kill_container,
                docker.backend.stop_container,
                docker.backend.wait_container,
                docker.backend.container_logs,
            ):
                error = yield _expect_failure(call(missing), DockerNotFound)
                assert missing in error.message
            yield _expect_failure(docker.backend.update_container(missing, {"CpuShares": 512}), DockerNotFound)

        @pytest_twisted.inlineCallbacks
        def test_logs_come_back_demultiplexed_in_order(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, PRINT_CMD))
            yield docker.backend.start_container(container_id)
            exit_code = yield docker.backend.wait_container(container_id)
            assert exit_code == 0
            logs = yield docker.backend.container_logs(container_id)
            assert logs == "out\nerr\n"
            last = yield docker.backend.container_logs(container_id, tail=1)
            assert last == "err\n"
            nothing = yield docker.backend.container_logs(container_id, tail=0)
            assert nothing == ""

        @pytest_twisted.inlineCallbacks
        def test_update_changes_the_limits(self, docker):
            name = docker.container_name()
            container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
            yield docker.backend.start_container(container_id)
            warnings = yield docker.backend.update_container(container_id, {"Memory": 64 * MiB, "MemorySwap": 64 * MiB})
            assert isinstance(warnings, list)
            info = yield docker.backend.inspect_container(container_id)
            assert (info["HostConfig"]["Memory"], info["HostConfig"]["MemorySwap"]) == (
                64 * MiB,
                64 * MiB,
            )

        @pytest_twisted.inlineCallbacks
        def test_a_container_over_its_memory_limit_is_oom_killed(self, docker):
            name = docker.container_name()
            config = container_config(
                docker,
                OOM_CMD,
                {RUN_LABEL: name},
                host_config={"Memory": 32 * MiB, "MemorySwap": 32 * MiB},
            )
            container_id = yield docker.backend.create_container(name, config)
            events, stream = yield watch_container(docker, container_id)
            try:
                yield docker.backend.start_container(container_id)
                exit_code = yield docker.backend.wait_container(container_id)
                yield _eventually(docker, lambda: "die" in _actions(events))
            finally:
                stream.cancel()
            assert exit_code == 137
            actions = _actions(events)
            assert "oom" in actions, actions
            assert actions.index("oom") < actions.index("die"), actions
            assert events[actions.index("die")]["Actor"]["Attributes"]["exitCode"] == "137"
            info = yield docker.backend.inspect_container(container_id)
            assert info["State"]["OOMKilled"] is True
            assert info["State"]["ExitCode"] == 137
            logs = yield docker.backend.container_logs(container_id)
            assert "survived" not in logs

    return DockerBackendContract
