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
- ``unique_name()``: a fresh ``repo:tag`` that nothing else uses.

The factory cleans up after itself (``request.addfinalizer``).
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from bai_agent.docker.engine import MIN_API_VERSION, api_version_key
from bai_agent.docker.images import kernel_image_from_inspect
from bai_agent.docker.interface import (
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


def _expect_failure(d, error_type):
    """A Deferred firing with the failure's exception; it fails if ``d`` did not fail so."""
    result = Deferred()

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
            assert (image.name, image.id, image.features, image.min_mem) == (
                name,
                image_id,
                ("query", "batch"),
                64 * 1024**2,
            )

        @pytest_twisted.inlineCallbacks
        def test_inspect_missing_image_is_not_found(self, docker):
            error = yield _expect_failure(
                docker.backend.inspect_image(docker.unique_name()), DockerNotFound
            )
            assert error.status == 404
            assert error.message

        @pytest_twisted.inlineCallbacks
        def test_events_stream_delivers_image_events(self, docker):
            name = docker.unique_name()
            image_id = docker.add_image(name, KERNEL_LABELS)
            events = []
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
            events = []
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
            events = []
            stream = backend.stream_events(events.append)
            yield _expect_failure(stream.done, DockerUnavailable)
            assert events == []

    return DockerBackendContract
