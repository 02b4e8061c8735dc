"""The composition root, on MemoryReactorClock with the fake Docker and MemoryEtcd."""

import json
import os

import pytest
from twisted.internet.testing import MemoryReactorClock

from bai_agent.config import AgentConfig
from bai_agent.service import build_agent_service
from bai_agent.tap import prepare_directories
from bai_agent.testing.backends import fake_backends
from bai_agent.testing.fake_docker import FakeDockerBackend
from bai_agent.testing.memory_etcd import MemoryEtcd


@pytest.fixture
def parts(tmp_path):
    reactor = MemoryReactorClock()
    etcd = MemoryEtcd(clock=reactor)
    docker = FakeDockerBackend()
    docker.add_image("bai-kernel/python:3.11", {"ai.backend.kernelspec": "1"})
    config = AgentConfig(
        agent_id="node-1",
        namespace="unit",
        amp_endpoint="tcp:7001",
        http_endpoint="tcp:7003:interface=127.0.0.1",
        advertise_host="10.1.2.3",
        scratch_root=str(tmp_path / "scratch"),
        state_dir=str(tmp_path / "state"),
        scratch_type="dir",
    )
    prepare_directories(config)
    service = build_agent_service(
        reactor, config, fake_backends(reactor, config.scratch_root, docker=docker, etcd=etcd)
    )
    yield reactor, etcd, docker, service
    if service.running:
        service.stopService()
        reactor.advance(5)


def record(etcd):
    value = etcd.items().get(b"/bai/unit/agents/node-1")
    return None if value is None else json.loads(value)


def test_one_multiservice_with_named_children_in_order(parts):
    _, _, _, service = parts
    assert service.name == "bai-agent"
    assert [child.name for child in service] == ["docker", "etcd", "kernels", "stats", "amp", "status"]


def test_started_agent_listens_registers_and_reports_healthy(parts):
    reactor, etcd, _, service = parts
    service.privilegedStartService()
    service.startService()
    ports = sorted(port for port, *_ in reactor.tcpServers)
    assert ports == [7001, 7003]
    reactor.advance(0)
    stored = record(etcd)
    assert stored["agent_id"] == "node-1"
    assert stored["amp_endpoint"] == "10.1.2.3:7001"
    assert stored["status_url"].endswith(":7003/")  # MemoryReactor reports 0.0.0.0; see functional tests
    assert stored["images"] == ["bai-kernel/python:3.11"]
    assert service.health.problems() == []


def test_stop_revokes_the_lease_and_leaves_no_timers(parts):
    reactor, etcd, _, service = parts
    service.privilegedStartService()
    service.startService()
    reactor.advance(10)
    d = service.stopService()
    reactor.advance(5)
    results = []
    d.addBoth(results.append)
    assert results == [None]
    assert record(etcd) is None
    assert reactor.getDelayedCalls() == []


def test_building_the_agent_touches_no_directory(tmp_path):
    # Creating the scratch root and the state dir is tap.prepare_directories' work, done
    # (and reported as a usage error) before the composition root runs.
    config = AgentConfig(agent_id="n", scratch_root=str(tmp_path / "scratch"), state_dir=str(tmp_path / "state"))
    reactor = MemoryReactorClock()
    backends = fake_backends(reactor, str(tmp_path))
    service = build_agent_service(reactor, config, backends)
    assert [child.name for child in service] == ["docker", "etcd", "kernels", "stats", "amp", "status"]
    assert sorted(os.listdir(tmp_path)) == []
