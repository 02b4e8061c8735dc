"""
Pulls (docs/protocol.md section 8) through the kernel registry, on the fake Docker backend
and its fake registry: the pull policies, one pull shared by every create that needs it, a
create destroyed while it waits, the error codes, the events, the timeouts, credentials
from the request and from etcd, and no password anywhere.
"""

import base64
import json

import pytest
from twisted.internet.defer import succeed

from bai_agent.docker.interface import DockerError, DockerNotFound
from bai_agent.images.credentials import Credentials, RegistryCredentials, parse_registry_auth, scrub
from bai_agent.images.pulls import ImagePulls, pull_error
from bai_agent.images.references import InvalidReference, parse_reference
from bai_agent.protocol import errors
from bai_agent.testing.deferreds import failure_of, has_fired, result_of
from bai_agent.testing.memory_etcd import MemoryEtcd
from tests.unit.test_kernel_registry import Harness

KERNEL_LABELS = {"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "python"}
REMOTE = "127.0.0.1:5000/team/python:3.11"
PASSWORD = "pa55-w0rd-that-must-not-leak"


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.backend.add_registry_image(REMOTE, KERNEL_LABELS, credentials=("alice", PASSWORD), size=4000)
    harness.backend.add_registry_image("127.0.0.1:5000/team/plain:1", {})
    harness.backend.add_registry_image("127.0.0.1:5000/open/python:1", KERNEL_LABELS)
    return harness


AUTH = {"username": "alice", "password": PASSWORD}


def create(h, kernel_id="k1", image=REMOTE, **kwargs):
    return h.registry.create(kernel_id, image, {"cpu": 1, "mem": "256m"}, **kwargs)


def event_types(h):
    return [(e.type, e.kernel_id) for e in h.journal.since(0) if e.type != "agent-started"]


def test_a_missing_image_is_pulled_with_the_requests_credentials(h):
    record = result_of(create(h, registry_auth=AUTH))
    assert record["status"] == "running" and record["image"] == REMOTE
    [(reference, auth)] = h.backend.pulls
    assert reference == REMOTE
    header = json.loads(base64.urlsafe_b64decode(auth + "=" * (-len(auth) % 4)))
    assert header == {"username": "alice", "password": PASSWORD, "serveraddress": "127.0.0.1:5000"}
    assert event_types(h) == [
        ("kernel-creating", "k1"),
        ("image-pulling", None),
        ("image-pull-progress", None),
        ("image-pulled", None),
        ("kernel-started", "k1"),
    ]
    progress = [e.data for e in h.journal.since(0) if e.type == "image-pull-progress"]
    assert progress[0]["image"] == REMOTE and progress[0]["bytes_total"] == 4000
    # Now local: the next create pulls nothing (policy missing).
    result_of(create(h, "k2"))
    assert len(h.backend.pulls) == 1


def test_the_policies(h):
    with pytest.raises(errors.ImageNotFound):
        result_of(create(h, image_pull="never"))
    assert h.backend.pulls == []
    result_of(create(h, "k1", "127.0.0.1:5000/open/python:1"))
    result_of(create(h, "k2", "127.0.0.1:5000/open/python:1", image_pull="always"))
    assert [ref for ref, _ in h.backend.pulls] == ["127.0.0.1:5000/open/python:1"] * 2
    # A locally built image is used as it is; "always" would go to the registry for it.
    result_of(create(h, "k3", "bai-kernel/python:3.11"))
    assert len(h.backend.pulls) == 2


def test_two_creates_and_a_pull_image_share_one_pull(h):
    h.backend.hold_pulls()
    first = create(h, "k1", registry_auth=AUTH)
    second = create(h, "k2", registry_auth=AUTH)
    pulled = h.registry.pull_image(REMOTE, AUTH)
    assert len(h.backend.pulls) == 1 and not first.called
    # While they wait they hold no grant, and they show as creating, with the pull.
    assert h.allocator.used()["cpu"] == 0
    assert [k["status"] for k in h.registry.records()] == ["creating", "creating"]
    [in_progress] = h.registry.pulls.in_progress()
    assert in_progress["image"] == REMOTE and in_progress["waiting"] == 3
    h.backend.finish_pulls()
    assert result_of(first)["status"] == result_of(second)["status"] == "running"
    assert result_of(pulled)["name"] == REMOTE
    assert h.registry.pulls.in_progress() == []


def test_a_create_destroyed_while_it_waits_leaves_the_pull_to_the_others(h):
    h.backend.hold_pulls()
    doomed = create(h, "k1", registry_auth=AUTH)
    other = create(h, "k2", registry_auth=AUTH)
    destroyed = result_of(h.registry.destroy("k1"))
    assert destroyed["kernel_id"] == "k1"
    error = failure_of(doomed).value
    assert isinstance(error, errors.KernelCreationFailed) and "destroyed" in str(error)
    assert "k1" not in h.registry.kernels
    h.backend.finish_pulls()
    assert result_of(other)["status"] == "running"
    assert [t for t in event_types(h) if t[1] == "k1"] == [("kernel-creating", "k1"), ("kernel-terminated", "k1")]
    assert h.allocator.used()["cpu"] == 1  # only k2's grant


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({}, errors.RegistryAuthFailed),  # no credentials for a private image
        ({"registry_auth": {"username": "alice", "password": "wrong"}}, errors.RegistryAuthFailed),
        ({"image": "127.0.0.1:5000/team/python:nope", "registry_auth": AUTH}, errors.ImageNotFound),
        ({"image": "127.0.0.1:5000/team/plain:1"}, errors.InvalidRequest),  # not a kernel image: kept
    ],
)
def test_failed_pulls_are_their_declared_error_and_leak_nothing(h, kwargs, error):
    image = kwargs.pop("image", REMOTE)
    failure = failure_of(create(h, "k1", image, **kwargs))
    assert isinstance(failure.value, error), failure.value
    assert PASSWORD not in str(failure.value)
    assert h.registry.kernels == {}
    h.assert_nothing_leaked()
    types = [t for t, _ in event_types(h)]
    assert types[0] == "kernel-creating" and types[-1] == "kernel-terminated"
    terminated = [e for e in h.journal.since(0) if e.type == "kernel-terminated"][0]
    assert terminated.data["reason"] == "creation-failed"
    if error is errors.InvalidRequest:
        assert "image-pulled" in types
        assert h.backend.container_status("k1") is None
        assert result_of(h.backend.inspect_image(image))  # the pulled image is kept
    else:
        assert "image-pull-failed" in types


def test_credentials_from_etcd_are_read_at_each_pull(h):
    etcd = MemoryEtcd(clock=h.clock)
    credentials = RegistryCredentials(etcd, "ns")
    h.registry.pulls = ImagePulls(h.clock, h.backend, h.docker, h.journal, credentials.lookup)
    key = b"/bai/ns/config/registries/127.0.0.1:5000"
    assert isinstance(failure_of(create(h, "k1")).value, errors.RegistryAuthFailed)
    result_of(etcd.put(key, json.dumps({"username": "alice", "password": "stale"}).encode()))
    assert isinstance(failure_of(create(h, "k1")).value, errors.RegistryAuthFailed)
    result_of(etcd.put(key, json.dumps(AUTH).encode()))  # the operator fixes it: no restart
    assert result_of(create(h, "k1"))["status"] == "running"
    # Unusable values are ignored (and their content is not logged).
    result_of(etcd.put(b"/bai/ns/config/registries/bad", b"{not json " + PASSWORD.encode()))
    assert result_of(credentials.lookup("bad")) is None


def test_the_password_never_reaches_the_journal(h):
    failure_of(create(h, "k1", registry_auth={"username": "alice", "password": "wrong" + PASSWORD}))
    result_of(create(h, "k2", registry_auth=AUTH))
    journal = json.dumps([e.to_json() if hasattr(e, "to_json") else e.data for e in h.journal.since(0)])
    assert PASSWORD not in journal
    assert PASSWORD not in repr(parse_registry_auth(AUTH))


def test_a_stalled_pull_is_aborted_and_the_create_fails(h):
    h.registry.pulls.stall_timeout = 10
    h.backend.hold_pulls()
    waiting = create(h, "k1", registry_auth=AUTH)
    h.clock.advance(12)
    error = failure_of(waiting).value
    assert isinstance(error, errors.ImagePullFailed) and "no progress for 10s" in str(error)
    h.assert_nothing_leaked()


def test_a_pull_that_takes_too_long_is_aborted(h):
    h.registry.pulls.timeout = 5
    h.registry.pulls.stall_timeout = 100
    h.backend.hold_pulls()
    waiting = h.registry.pull_image(REMOTE, AUTH)
    h.clock.advance(6)
    assert "more than 5s" in str(failure_of(waiting).value)


def test_stopping_the_agent_ends_a_create_that_waits_for_a_pull(h):
    h.backend.hold_pulls()
    waiting = create(h, "k1", registry_auth=AUTH)
    stopped = h.registry.stopService()
    assert isinstance(failure_of(waiting).value, errors.BackendUnavailable)
    assert has_fired(stopped)


def test_remove_image_refuses_an_image_in_use_and_removes_it_after(h):
    result_of(create(h, "k1", "127.0.0.1:5000/open/python:1"))
    with pytest.raises(errors.ImageInUse, match="k1"):
        result_of(h.registry.remove_image("127.0.0.1:5000/open/python:1"))
    result_of(h.registry.destroy("k1"))
    result_of(h.registry.remove_image("127.0.0.1:5000/open/python:1"))
    assert h.registry.listed_image("127.0.0.1:5000/open/python:1") is None
    with pytest.raises(errors.ImageNotFound):
        result_of(h.registry.remove_image("127.0.0.1:5000/open/python:1"))
    with pytest.raises(errors.ImageNotFound):  # not a kernel image: not the agent's
        result_of(h.registry.remove_image("plain/debian:12"))
    with pytest.raises(errors.InvalidRequest):
        result_of(h.registry.remove_image("../x"))


# -- the parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest, shown",
    [
        ("python", "docker.io", "library/python", None, None, "python:latest"),
        ("python:3.11", "docker.io", "library/python", "3.11", None, "python:3.11"),
        ("team/py:1", "docker.io", "team/py", "1", None, "team/py:1"),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000", "a/b", "c", None, "127.0.0.1:5000/a/b:c"),
        ("localhost/x", "localhost", "x", None, None, "localhost/x:latest"),
        ("reg.example/x@sha256:" + "a" * 64, "reg.example", "x", None, "sha256:" + "a" * 64, None),
        ("[::1]:5000/x:1", "[::1]:5000", "x", "1", None, "[::1]:5000/x:1"),
    ],
)
def test_references_parse_as_docker_reads_them(text, registry, repository, tag, digest, shown):
    reference = parse_reference(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert str(reference) == (shown or text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "a//b",
        "a/b:",
        "a/b:-tag",
        "a/b:" + "t" * 129,
        "a@sha256:short",
        "a@md5:" + "0" * 32,
        "reg.example:0/x",
        "reg.example:99999/x",
        "reg.exa mple/x",
        "x\n",
        "-x/y",
        "a/../b",
        "r" * 600,
        "reg.example/" + "a" * 250,
        "[zz]:5000/x",
        5,
        None,
    ],
)
def test_bad_references_are_refused_before_docker_sees_them(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_registry_answers_map_to_the_declared_errors():
    credentials = Credentials("u", PASSWORD)
    cases = [
        (DockerError('Head "http://r/v2/x/manifests/1": no basic auth credentials', 500), errors.RegistryAuthFailed),
        (DockerError("unauthorized: authentication required", 500), errors.RegistryAuthFailed),
        (DockerNotFound("manifest for r/x:1 not found: manifest unknown", 404), errors.ImageNotFound),
        (DockerError("manifest for r/x:1 not found: manifest unknown: manifest unknown", 500), errors.ImageNotFound),
        (
            DockerError('Get "http://r/v2/": dial tcp 127.0.0.1:5999: connect: connection refused', 500),
            errors.ImagePullFailed,
        ),
        (DockerError(f"weird {PASSWORD} echo", 500), errors.ImagePullFailed),
    ]
    for error, declared in cases:
        mapped = pull_error(error, "r/x:1", credentials)
        assert isinstance(mapped, declared), (error, mapped)
        assert PASSWORD not in str(mapped)
    assert scrub(f"a {PASSWORD} b", credentials) == "a <hidden> b"


def test_registry_auth_is_checked_without_echoing_it():
    for bad in (
        {"username": "u"},
        {"username": "u", "password": "p", "x": 1},
        {"username": 1, "password": "p"},
        {"username": "u", "password": "p\n" + PASSWORD},
        "u:p",
        [],
    ):
        with pytest.raises(errors.InvalidRequest) as refused:
            parse_registry_auth(bad)
        assert PASSWORD not in str(refused.value)
    assert parse_registry_auth(None) is None
    assert result_of(succeed(parse_registry_auth(AUTH))) == Credentials("alice", PASSWORD)
