"""
etcd goes away under a running agent (each test has an etcd of its own): AMP keeps
serving and the record comes back; and when etcd returns with its data gone, the agent
registers again and writes back the namespace secret it knew, so that managers keep
authenticating with it.
"""

import pytest
import pytest_twisted

from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import blocking, wait_until_blocking
from tests.faults.helpers import etcd_get, etcd_put, etcd_record, kernel_ids

pytestmark = pytest.mark.faults


def health(agent, code, word=None):
    status, body = agent.http("/healthz")
    return status == code and (word is None or word.encode() in body)


@pytest_twisted.inlineCallbacks
def test_amp_serves_through_an_etcd_outage_and_the_record_comes_back(scenario, own_etcd, reactor):
    agent = scenario.new_agent("etcdout", etcd=own_etcd)
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    yield client.create_kernel("k1", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client.execute("k1", "query", "x = 41")
    seen = manager.last_acknowledged()

    yield blocking(reactor, own_etcd.stop)
    yield wait_until_blocking(reactor, lambda: health(agent, 503, "etcd"), 30, "/healthz 503 naming etcd")
    # Everything a manager does keeps working, on the connection it had and on a new one.
    yield client.create_kernel("k2", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client.execute("k2", "query", "x = 41")
    other = yield scenario.connect(agent)
    assert kernel_ids((yield other.list_kernels())) == ["k1", "k2"]
    assert (yield scenario.check_survivor(other, "k1"))

    yield blocking(reactor, own_etcd.start)
    record = yield wait_until_blocking(
        reactor,
        lambda: (lambda r: r if r and r.get("kernels") == 2 else None)(
            etcd_record(own_etcd.url, agent.namespace, agent.agent_id)
        ),
        30,
        "the record back, counting both kernels",
    )
    assert record["status"] == "running"
    yield wait_until_blocking(reactor, lambda: health(agent, 200), 30, "/healthz 200 again")
    assert (yield scenario.check_survivor(client, "k2"))
    manager.expect("kernel-started", "k2", after=seen)
    yield manager.settle()
    assert [e["kernel_id"] for e in manager.events("kernel-terminated")] == [], manager.report()

    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []


@pytest_twisted.inlineCallbacks
def test_wiped_etcd_gets_the_agent_and_the_same_secret_back(scenario, own_etcd, reactor):
    agent = scenario.new_agent("etcdwipe", etcd=own_etcd)
    secret_key = f"/bai/{agent.namespace}/config/agent/secret"
    secret = etcd_get(own_etcd.url, secret_key)
    assert secret == scenario.secret(agent)
    old = yield scenario.connect(agent)
    yield old.create_kernel("k1", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield old.execute("k1", "query", "x = 41")

    marker = f"/faults/{scenario.token}/marker"
    etcd_put(own_etcd.url, marker, "before the wipe")
    yield blocking(reactor, own_etcd.restart, True)
    assert etcd_get(own_etcd.url, marker) is None  # really wiped (the agent may be back already)
    yield wait_until_blocking(
        reactor, lambda: etcd_record(own_etcd.url, agent.namespace, agent.agent_id), 30, "the agent registered again"
    )
    assert etcd_get(own_etcd.url, secret_key) == secret
    # The manager's open connection, and a new one made with the secret it knew.
    assert (yield old.ping("still")) == "still"
    again = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    scenario.clients.append(again)
    assert (yield scenario.check_survivor(again, "k1"))
    yield wait_until_blocking(reactor, lambda: health(agent, 200), 30, "/healthz 200")

    leaks = yield scenario.clean_up(agent)
    assert leaks == ([], [])
    assert scenario.figures.problems() == []
