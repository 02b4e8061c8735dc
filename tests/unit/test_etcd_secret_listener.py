"""EtcdService secret listeners: told of every change of the namespace secret, and only of changes."""

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bai_agent.etcd.service import EtcdService
from bai_agent.testing.deferreds import result_of
from bai_agent.testing.memory_etcd import MemoryEtcd

SECRET_KEY = b"/bai/ns/config/agent/secret"
FIRST = "ab" * 32
SECOND = "cd" * 40


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def etcd(clock):
    etcd = MemoryEtcd(clock)
    result_of(etcd.put(SECRET_KEY, FIRST.encode()))
    return etcd


@pytest.fixture
def service(clock, etcd, tmp_path):
    service = EtcdService(
        clock,
        etcd,
        "ns",
        "agent-1",
        lambda: {"agent_id": "agent-1"},
        secret_cache_path=str(tmp_path / "secret"),
        random=lambda: 1.0,
    )
    yield service
    if service.running:
        service.stopService()


def test_listeners_hear_the_secret_an_operator_rotates_to(service, etcd):
    heard = []
    service.add_secret_listener(heard.append)
    service.startService()
    assert service.secret == FIRST
    assert heard == [FIRST]  # the first one adopted
    result_of(etcd.put(SECRET_KEY, SECOND.encode()))
    assert heard == [FIRST, SECOND]
    result_of(etcd.put(SECRET_KEY, SECOND.encode()))  # the same again is no change
    result_of(etcd.put(SECRET_KEY, b"not hex"))  # refused, the secret stays
    assert heard == [FIRST, SECOND]
    assert service.secret == SECOND


def test_a_failing_listener_does_not_stop_the_rotation(service, etcd):
    heard = []

    def broken(secret):
        raise RuntimeError("listener bug")

    service.add_secret_listener(broken)
    service.add_secret_listener(heard.append)
    service.startService()
    with capturedLogs() as events:
        result_of(etcd.put(SECRET_KEY, SECOND.encode()))
    assert service.secret == SECOND and heard[-1] == SECOND
    failures = [event for event in events if "secret listener" in event["log_format"]]
    assert len(failures) == 1
    assert not any(SECOND in str(event.get("log_format")) for event in events)
