"""
SIGTERM is a graceful stop: managers hear ``agent-stopping``, commands in flight get their
answers, the etcd record goes at once, the process exits 0, and the kernels either keep
running for the next start (default) or are all destroyed (``--destroy-kernels-on-stop``).
"""

import signal

import pytest
import pytest_twisted

from bai_agent.testing.waiting import wait_until
from tests.faults.helpers import STOP_REASONS, etcd_record, kernel_ids

pytestmark = pytest.mark.faults


SLOW_CODE = "open('started', 'w').close()\nimport time\ntime.sleep(2)\nprint('done')"


@pytest_twisted.inlineCallbacks
def test_sigterm_answers_work_in_flight_and_leaves_kernels_running(scenario, reactor):
    agent = scenario.new_agent("graceful", extra=["--stop-grace-period", "20"])
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    record = yield client.create_kernel("k1", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client.execute("k1", "query", "x = 41")
    assert etcd_record(agent.etcd_url, agent.namespace, agent.agent_id) is not None
    seen = manager.last_acknowledged()

    running = client.execute("k1", "query", SLOW_CODE, options={"flush_timeout": 60})
    yield wait_until(reactor, lambda: (agent.scratch_root / "k1" / "started").exists(), 30, "the slow run to start")
    agent.process.send_signal(signal.SIGTERM)
    stopping = yield manager.wait_for("agent-stopping")
    assert stopping["seq"] > seen
    answer = yield running
    assert answer["status"] == "finished"
    assert answer["console"] == [["stdout", "done\n"]]

    # One SIGTERM only, as a supervisor sends it: wait for the exit, do not signal again.
    code = yield scenario.wait_exit(agent)
    assert code == 0
    # Revoked, not left to expire: gone the moment the process is.
    assert etcd_record(agent.etcd_url, agent.namespace, agent.agent_id) is None
    assert agent.docker.running(record["container_id"])
    assert scenario.stray_dirs(agent, ["k1"]) == []

    yield scenario.start_async(agent)
    client = yield scenario.connect(agent)
    assert kernel_ids((yield client.list_kernels())) == ["k1"]
    assert (yield scenario.check_survivor(client, "k1"))
    manager.expect("agent-stopping", after=seen)
    manager.expect("agent-started", after=seen)
    yield manager.settle()
    assert manager.terminations("k1") == [], manager.report()

    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []


@pytest_twisted.inlineCallbacks
def test_sigterm_with_destroy_kernels_on_stop_leaves_nothing(scenario):
    agent = scenario.new_agent("destroying", extra=["--destroy-kernels-on-stop"])
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    for kernel_id in ("k1", "k2"):
        yield client.create_kernel(kernel_id, scenario.image, {"cpu": 0.5, "mem": "64m"})
    seen = manager.last_acknowledged()

    assert (yield scenario.stop_async(agent)) == 0
    assert etcd_record(agent.etcd_url, agent.namespace, agent.agent_id) is None
    assert agent.docker.agent_containers(agent.agent_id) == []
    assert scenario.stray_dirs(agent) == []

    # What the manager had not acknowledged before the connection closed, it gets on
    # its next Subscribe after the next start.
    for kernel_id in ("k1", "k2"):
        manager.expect("kernel-terminated", kernel_id, STOP_REASONS, after=seen)
    manager.expect("agent-stopping", after=seen)
    yield scenario.start_async(agent)
    yield manager.settle()
    for kernel_id in ("k1", "k2"):
        assert len(manager.terminations(kernel_id)) == 1, manager.report()
    reasons = {event["data"]["reason"] for event in manager.events("kernel-terminated")}
    assert reasons <= STOP_REASONS
    stop = manager.events("agent-stopping")[-1]["seq"]
    assert all(event["seq"] < stop for event in manager.events("kernel-terminated")), (
        "kernels ended after agent-stopping"
    )
    client = yield scenario.connect(agent)
    assert (yield client.list_kernels()) == []
    info = yield client.get_agent_info()
    assert info["resources"]["cpu"]["used"] == 0 and info["resources"]["mem"]["used"] == 0

    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []
