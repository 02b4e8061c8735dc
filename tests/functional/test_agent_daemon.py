"""
The agent as an operator runs it: a real process on real etcd and Docker, driven with
bai-agent-ctl, the AMP client and the status page.
"""

import json
import socket
import time

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.etcd_server import EtcdServer
from tests.functional.agent_process import AgentProcess, etcd_record

pytestmark = pytest.mark.functional


KERNEL_IMAGE = "bai-kernel/python:3.11"


def record_key(agent):
    return f"/bai/{agent.namespace}/agents/{agent.agent_id}"


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    process = AgentProcess(tmp_path, etcd_server.addr).start()
    yield process
    process.stop()
    process.remove_state()


def test_agent_registers_within_5s_and_refreshes_its_record(agent, etcd_server):
    started = time.monotonic()
    record = agent.wait_for(lambda: etcd_record(etcd_server.url, record_key(agent)), 5, "the agent record")
    assert time.monotonic() - started < 5
    assert record["agent_id"] == agent.agent_id
    assert record["status"] == "running"
    assert record["protocol"] == 1
    assert record["amp_endpoint"] == f"127.0.0.1:{agent.amp_port}"
    assert record["status_url"] == f"http://127.0.0.1:{agent.http_port}/"
    assert set(record["resources"]) == {"cpu", "mem", "cuda.device", "scratch"}
    assert record["resources"]["cpu"]["capacity"] > 0
    first = record["heartbeat_at"]

    def last_heartbeat():
        code, body = agent.http("/status.json")
        return json.loads(body)["etcd"]["last_heartbeat_at"] if code in (200, 503) else None

    # Every heartbeat keeps the lease alive; the record is rewritten when it changes.
    agent.wait_for(lambda: (last_heartbeat() or 0) > first + 1.5, 5, "two heartbeats (lease keep-alives)")
    assert etcd_record(etcd_server.url, record_key(agent)) is not None


def test_healthz_ctl_and_status_page_show_a_healthy_agent(agent, etcd_server, tmp_path):
    agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 10, "/healthz 200")
    listed = agent.ctl("agents")
    assert listed.returncode == 0, listed.stderr
    assert agent.agent_id in listed.stdout
    assert f"127.0.0.1:{agent.amp_port}" in listed.stdout
    info = agent.ctl("info", agent.agent_id)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["agent_id"] == agent.agent_id
    # The kernel image is built by scripts/build-kernel-image (README, .ci/run).
    agent.wait_for(lambda: KERNEL_IMAGE in agent.ctl("images", agent.agent_id).stdout, 10, "the kernel image listed")
    status, page = agent.http("/")
    assert status == 200 and agent.agent_id.encode() in page and b"healthy" in page
    status, body = agent.http("/status.json")
    assert json.loads(body)["healthy"] is True
    status, metrics = agent.http("/metrics")
    assert status == 200 and b"bai_agent_etcd_registered 1.0" in metrics


def test_unknown_agent_and_missing_etcd_are_clear_ctl_errors(agent, etcd_server):
    missing = agent.ctl("info", "no-such-agent")
    assert missing.returncode == 1
    assert "no agent 'no-such-agent'" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest_twisted.inlineCallbacks
def test_amp_authentication_and_garbage(agent, etcd_server, tmp_path, reactor):
    agent.wait_for(lambda: etcd_record(etcd_server.url, record_key(agent)), 5, "the agent record")
    address = f"127.0.0.1:{agent.amp_port}"
    secret = agent.secret_path.read_text().strip()

    with pytest.raises(errors.AuthFailed):
        yield AgentClient.connect(reactor, address, "00" * 32)

    raw = yield AgentClient.connect(reactor, address, secret)
    raw.close()

    # A connection that skips Authenticate gets NOT_AUTHENTICATED, and stays usable.
    from twisted.internet.endpoints import connectProtocol
    from twisted.protocols import amp

    from bai_agent.protocol.client import ManagerLocator, client_endpoint

    unauthenticated = AgentClient(amp.AMP(locator=ManagerLocator()))
    yield connectProtocol(client_endpoint(reactor, address), unauthenticated.protocol)
    with pytest.raises(errors.NotAuthenticated):
        yield unauthenticated.get_agent_info()
    hello = yield unauthenticated.hello()
    yield unauthenticated.authenticate(secret, hello["nonce"])
    info = yield unauthenticated.get_agent_info()
    assert info["agent_id"] == agent.agent_id

    # Garbage on the AMP port closes that connection only.
    with socket.create_connection(("127.0.0.1", agent.amp_port), timeout=5) as garbage:
        garbage.sendall(bytes(range(256)) * 64)
        garbage.settimeout(5)
        try:
            while garbage.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert (yield unauthenticated.ping("still here")) == "still here"
    fresh = yield AgentClient.connect(reactor, address, secret)
    assert (yield fresh.get_agent_info())["agent_id"] == agent.agent_id
    fresh.close()
    unauthenticated.close()


def test_sigterm_revokes_the_lease_and_exits_0(agent, etcd_server):
    agent.wait_for(lambda: etcd_record(etcd_server.url, record_key(agent)), 5, "the agent record")
    assert agent.stop() == 0
    assert etcd_record(etcd_server.url, record_key(agent)) is None


def test_etcd_outage_keeps_amp_serving_and_the_record_comes_back(tmp_path, docker_host):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    agent = AgentProcess(tmp_path, etcd.addr, agent_id="agent-outage").start()
    try:
        agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 10, "/healthz 200")
        secret = agent.secret_path
        etcd.stop()
        status = agent.wait_for(
            lambda: (lambda r: r if r[0] == 503 else None)(agent.http("/healthz")), 10, "/healthz 503"
        )
        assert b"etcd" in status[1]
        # AMP still serves, with the secret the agent already knew.
        info = agent.ctl("info", f"127.0.0.1:{agent.amp_port}", secret_file=secret)
        assert info.returncode == 0, info.stderr
        etcd.start()
        started = time.monotonic()
        agent.wait_for(lambda: etcd_record(etcd.url, record_key(agent)), 10, "the record back after etcd returned")
        assert time.monotonic() - started < 10
        agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 10, "/healthz 200 again")
    finally:
        agent.stop()
        agent.remove_state()
        etcd.stop()


def test_taken_port_fails_startup_with_a_clear_message(tmp_path, etcd_server, docker_host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        agent = AgentProcess(tmp_path, etcd_server.addr, agent_id="agent-taken")
        agent.argv[agent.argv.index("--amp-endpoint") + 1] = f"tcp:{port}:interface=127.0.0.1"
        code = agent.failed_start()
    assert code != 0
    assert (
        f"bai-agent: cannot listen on tcp:{port}:interface=127.0.0.1 for amp: Address already in use"
        in agent.log_text()
    )
    assert "Traceback" not in agent.log_text()


def test_bad_option_is_a_usage_error(tmp_path, etcd_server):
    agent = AgentProcess(tmp_path, etcd_server.addr, agent_id="agent-bad", extra=["--reserved-mem", "12q"])
    agent.start()
    try:
        code = agent.process.wait(30)
    finally:
        agent.stop()
        agent.remove_state()
    assert code != 0
    assert "--reserved-mem" in agent.log_text()
