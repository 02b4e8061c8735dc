"""
Images from a real registry (docs/protocol.md section 8): Debian's docker-registry on
loopback with htpasswd (bcrypt) authentication, a real agent and real Docker. Each pushed
image has a layer of its own and is removed locally first, so that a pull downloads.
Covered: no credentials, a wrong password, a missing tag, ``never``, two concurrent
creates of one missing image (one pull), etcd credentials, a registry that dies mid-pull,
a non-kernel image, removal in use, ``bai-agent-ctl pull``, and the password nowhere.
"""

import json
import secrets
import time

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.testing.docker_cli import docker
from bai_agent.testing.registry import GatedProxy, RegistryServer
from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import etcd_delete, etcd_put, etcd_record, running_agent
from tests.functional.executing import IMAGE
from tests.functional.test_services_takeover import connect

pytestmark = pytest.mark.functional

PASSWORD = "reg-" + secrets.token_hex(12)
RESOURCES = {"cpu": 0.5, "mem": "128m"}


@pytest.fixture(scope="module")
def registry(docker_host):
    server = RegistryServer(PASSWORD).start()
    server.images = {
        "kernel": server.push("kernels/python:1", IMAGE),
        "shared": server.push("kernels/python:shared", IMAGE),
        "etcd": server.push("kernels/python:etcd", IMAGE),
        "ctl": server.push("kernels/python:ctl", IMAGE),
        "big": server.push("kernels/python:big", IMAGE, layer_bytes=48 << 20),
        "plain": server.push("plain/busybox:1", "bai-kernel/python:3.11", labels={"ai.backend.kernelspec": "0"}),
    }
    yield server
    server.stop()
    for reference in server.images.values():
        docker("rmi", "-f", reference, check=False)


@pytest.fixture
def agent(tmp_path, etcd_server, registry):
    with running_agent(tmp_path, etcd_server.addr, "agent-pulls", ["--image-pull-stall-timeout", "4"]) as process:
        yield process


def auth(registry, password=PASSWORD):
    return {"username": registry.username, "password": password}


def local(reference):
    return docker("image", "inspect", reference, check=False).returncode == 0


@pytest_twisted.inlineCallbacks
def events_of(reactor, client, kind, image, count=1, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in client.events if e["type"] == kind and (e["data"] or {}).get("image") == image]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, (kind, image, client.events[-10:])
        yield sleep(reactor, 0.1)


@pytest_twisted.inlineCallbacks
def test_a_private_image_is_pulled_with_credentials_and_every_error_is_its_code(agent, reactor, registry, etcd_server):
    client = yield connect(reactor, agent)
    yield client.subscribe(0)
    image = registry.images["kernel"]
    assert not local(image)
    with pytest.raises(errors.RegistryAuthFailed):
        yield client.create_kernel("k1", image, RESOURCES)
    with pytest.raises(errors.RegistryAuthFailed):
        yield client.create_kernel("k1", image, RESOURCES, registry_auth=auth(registry, "wrong-" + PASSWORD))
    with pytest.raises(errors.ImageNotFound):
        yield client.create_kernel("k1", image.replace(":1", ":nope"), RESOURCES, registry_auth=auth(registry))
    with pytest.raises(errors.ImageNotFound):
        yield client.create_kernel("k1", image, RESOURCES, image_pull="never", registry_auth=auth(registry))
    with pytest.raises(errors.InvalidRequest):
        yield client.create_kernel("k1", "127.0.0.1:1/UPPER", RESOURCES)
    assert not local(image) and (yield client.list_kernels()) == []
    record = yield client.create_kernel("k1", image, RESOURCES, registry_auth=auth(registry))
    assert record["status"] == "running" and record["image"] == image and local(image)
    answer = yield client.execute("k1", "query", "print(6 * 7)")
    assert answer["console"] == [["stdout", "42\n"]]
    [pulled] = yield events_of(reactor, client, "image-pulled", image)
    assert pulled["data"]["id"].startswith("sha256:") and pulled["data"]["elapsed"] >= 0
    kinds = [e["type"] for e in client.events if (e["data"] or {}).get("image") == image]
    assert kinds.count("image-pull-failed") == 2 and "image-pulled" in kinds
    failed = [e["data"]["error"] for e in client.events if e["type"] == "image-pull-failed"]
    assert any("unauthorized" in text or "auth" in text for text in failed)
    # In use: not removed; after the kernel, removed.
    with pytest.raises(errors.ImageInUse):
        yield client.remove_image(image)
    yield client.destroy_kernel("k1")
    yield client.remove_image(image)
    assert not local(image)
    with pytest.raises(errors.ImageNotFound):
        yield client.remove_image(image)
    # The password is nowhere: not in the log, the journal, the page, /metrics, etcd.
    yield sleep(reactor, 0.5)
    for text in (
        agent.log_text(),
        (agent.state_dir / "events.jsonl").read_text(errors="replace"),
        agent.http("/")[1].decode(),
        agent.http("/status.json")[1].decode(),
        agent.http("/metrics")[1].decode(),
        json.dumps(etcd_record(etcd_server.url, f"/bai/{agent.namespace}/agents/{agent.agent_id}")),
        json.dumps(client.events),
    ):
        assert PASSWORD not in text
    client.close()


@pytest_twisted.inlineCallbacks
def test_two_creates_of_one_missing_image_share_one_pull(agent, reactor, registry):
    client = yield connect(reactor, agent)
    yield client.subscribe(0)
    image = registry.images["shared"]
    first = client.create_kernel("s1", image, RESOURCES, registry_auth=auth(registry))
    second = client.create_kernel("s2", image, RESOURCES, registry_auth=auth(registry))
    pulled = client.pull_image(image, auth(registry))
    records = [(yield first), (yield second)]
    entry = yield pulled
    assert [r["status"] for r in records] == ["running", "running"] and entry["name"] == image
    assert len([e for e in client.events if e["type"] == "image-pulling" and e["data"]["image"] == image]) == 1
    yield client.reset()
    client.close()


@pytest_twisted.inlineCallbacks
def test_credentials_in_etcd_are_used_and_a_non_kernel_image_is_kept_but_refused(agent, reactor, registry, etcd_server):
    client = yield connect(reactor, agent)
    image = registry.images["etcd"]
    with pytest.raises(errors.RegistryAuthFailed):
        yield client.create_kernel("e1", image, RESOURCES)
    key = f"/bai/{agent.namespace}/config/registries/{registry.address}"
    etcd_put(etcd_server.url, key, json.dumps(auth(registry)))
    try:
        record = yield client.create_kernel("e1", image, RESOURCES)  # read now: no restart
        assert record["status"] == "running"
        plain = registry.images["plain"]
        with pytest.raises(errors.InvalidRequest, match="not a kernel image"):
            yield client.pull_image(plain)
    finally:
        etcd_delete(etcd_server.url, key)
    assert local(plain)  # kept
    assert plain not in [i["name"] for i in (yield client.list_images())]
    yield client.reset()
    client.close()


@pytest_twisted.inlineCallbacks
def test_a_registry_that_dies_mid_pull_fails_the_create_and_leaks_nothing(agent, reactor, registry):
    proxy = GatedProxy(registry.port, cut_after=8 << 20)
    image = registry.images["big"].replace(registry.address, proxy.address)
    client = yield connect(reactor, agent)
    started = time.monotonic()
    with pytest.raises(errors.ImagePullFailed):
        yield client.create_kernel("d1", image, RESOURCES, registry_auth=auth(registry))
    assert proxy.cut.is_set() and time.monotonic() - started < 60
    assert (yield client.list_kernels()) == []
    assert agent.http("/healthz")[0] == 200
    client.close()


def test_ctl_pull_shows_progress_and_rmi_removes(agent, registry):
    image = registry.images["ctl"]
    done = agent.ctl("pull", agent.agent_id, image, "--username", registry.username, "--password-stdin", stdin=PASSWORD)
    assert done.returncode == 0, done.stderr
    assert f"pulled {image}" in done.stdout
    assert any(line.startswith(image + " ") for line in done.stdout.splitlines()), done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    removed = agent.ctl("rmi", agent.agent_id, image)
    assert removed.returncode == 0 and not local(image), removed.stderr
    refused = agent.ctl("pull", agent.agent_id, image)
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
