"""
kill -9 of an agent with a warm pool (docs/protocol.md section 9), after claims and in the
middle of claims: the next run adopts the claimed kernels as kernels (with their
interpreter state), takes the pool containers back into the pool, never counts one as the
other, and leaks no container, grant, home or event.
"""

import json
import signal
import time

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from bai_agent.testing.waiting import sleep
from tests.faults.helpers import by_id
from tests.functional.agent_process import etcd_put

pytestmark = pytest.mark.faults

POOL = 3
RESOURCES = {"cpu": 0.25, "mem": "64m"}


def pool_state(agent):
    status, body = agent.http("/status.json")
    assert status == 200
    return json.loads(body)["pool"]


@pytest_twisted.inlineCallbacks
def steady_pool(reactor, agent, image, ready=POOL, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        state = pool_state(agent)["images"].get(image, {})
        if state.get("ready") == ready and state.get("filling") == 0 and state.get("removing") == 0:
            return
        assert time.monotonic() < deadline, pool_state(agent)
        yield sleep(reactor, 0.2)


@pytest_twisted.inlineCallbacks
def check_books(scenario, agent, client, settle=10):
    """
    ``books`` until they balance: what is still being removed may take a moment, a leak
    stays. Fails with the last imbalance after ``settle`` seconds.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            return (yield books(scenario, agent, client))
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        yield sleep(scenario.reactor, 0.2)


@pytest_twisted.inlineCallbacks
def books(scenario, agent, client):
    """Every container of the agent is a listed kernel's or the pool's, and the grants are the kernels'."""
    kernels = by_id((yield client.list_kernels()))
    pool = pool_state(agent)
    pool_count = sum(state["ready"] + state["filling"] for state in pool["images"].values())
    containers = set(agent.docker.agent_containers(agent.agent_id))
    kernel_containers = {kernel["container_id"] for kernel in kernels.values()}
    assert len(kernel_containers) == len(kernels) and kernel_containers <= containers
    assert len(containers) == len(kernels) + pool_count, (sorted(containers), kernels, pool)
    used = yield scenario.grants_used(client)
    assert used["cpu"] == pytest.approx(sum(k["resources"]["cpu"] for k in kernels.values()))
    assert used["mem"] == sum(k["resources"]["mem"] for k in kernels.values())
    homes = sorted(p.name for p in agent.scratch_root.iterdir() if p.name not in (".volumes", ".pool"))
    assert homes == sorted(kernels)
    pool_homes = list((agent.scratch_root / ".pool").iterdir()) if (agent.scratch_root / ".pool").exists() else []
    assert len(pool_homes) == pool_count
    return kernels


@pytest_twisted.inlineCallbacks
def test_kill_9_after_and_during_claims_loses_and_leaks_nothing(scenario, reactor):
    agent = scenario.new_agent("warm", ["--warm-pool", f"{scenario.image}={POOL}"])
    manager = scenario.recorder(agent)
    yield manager.connect()
    yield steady_pool(reactor, agent, scenario.image)
    client = yield scenario.connect(agent)
    for kernel_id in ("after-a", "after-b"):
        record = yield client.create_kernel(kernel_id, scenario.image, RESOURCES)
        assert record["warm"] is True
        answer = yield client.execute(kernel_id, "query", "x = 41")
        assert answer["status"] == "finished"

    # After claims: the claimed kernels come back as kernels, the pool as the pool.
    yield steady_pool(reactor, agent, scenario.image)
    assert (yield scenario.stop_async(agent, signal.SIGKILL)) == -signal.SIGKILL
    yield scenario.start_async(agent)
    client = yield scenario.connect(agent)
    yield steady_pool(reactor, agent, scenario.image)
    kernels = yield check_books(scenario, agent, client)
    assert sorted(kernels) == ["after-a", "after-b"] and all(k["warm"] for k in kernels.values())
    for kernel_id in ("after-a", "after-b"):
        assert (yield scenario.check_survivor(client, kernel_id)), f"{kernel_id} lost its interpreter"

    # During claims: creates sent, and the agent killed while they are under way.
    for round_number, delay in enumerate((0.0, 0.002, 0.01)):
        creates = [client.create_kernel(f"during-{round_number}-{i}", scenario.image, RESOURCES) for i in range(POOL)]
        yield sleep(reactor, delay)
        assert (yield scenario.stop_async(agent, signal.SIGKILL)) == -signal.SIGKILL
        yield DeferredList(creates, consumeErrors=True)
        yield scenario.start_async(agent)
        client = yield scenario.connect(agent)
        yield steady_pool(reactor, agent, scenario.image)
        kernels = yield check_books(scenario, agent, client)
        for kernel_id, kernel in kernels.items():
            assert kernel["status"] == "running"
            answer = yield client.execute(kernel_id, "query", "print(6 * 7)")
            assert answer["console"] == [["stdout", "42\n"]], (kernel_id, answer)
        assert {"after-a", "after-b"} <= set(kernels)

    # The pool goes when the cluster says so; then the usual clean-up finds nothing left.
    etcd_put(agent.etcd_url, f"/bai/{agent.namespace}/config/agent/warm_pool", "{}")
    deadline = time.monotonic() + 30
    while pool_state(agent)["images"].get(scenario.image, {}).get("ready", 0):
        assert time.monotonic() < deadline, pool_state(agent)
        yield sleep(reactor, 0.2)
    yield manager.settle()
    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    # Every kernel a manager heard of being created was told to have started or ended.
    started = {e["kernel_id"] for e in manager.events("kernel-creating")}
    ended = {e["kernel_id"] for e in manager.events("kernel-terminated")}
    assert started <= ended, (sorted(started - ended), manager.report())
    assert scenario.figures.problems() == []
