"""
The Docker daemon stops and starts under a running agent: the suite's own private dockerd
(``bai_agent.testing.private_docker``), never the machine's.

Without ``--live-restore`` the kernels die with the daemon: each is reported
``kernel-terminated`` once and leaves nothing. With it they survive and still execute.
Either way /healthz names Docker while it is away, and the events stream comes back:
a kernel killed after the restart is reported ``self-terminated`` (the stream saw the
``kill``; the periodic re-list alone would take an unexplained exit 137 for the OOM killer).
"""

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks

from bai_agent.testing.waiting import blocking, wait_until_blocking
from tests.faults.helpers import DockerAPI, kernel_ids

pytestmark = pytest.mark.faults


def health(agent, code, word=None):
    status, body = agent.http("/healthz")
    return status == code and (word is None or word.encode() in body)


@inlineCallbacks
def check_outage_and_return(reactor, daemon, agent, live_restore):
    yield blocking(reactor, daemon.stop)
    yield wait_until_blocking(reactor, lambda: health(agent, 503, "docker"), 30, "/healthz 503 naming docker")
    yield blocking(reactor, daemon.start, live_restore)
    yield wait_until_blocking(reactor, lambda: health(agent, 200), 60, "/healthz 200 after Docker returned")


@inlineCallbacks
def check_events_stream_is_back(scenario, client, manager, agent):
    seen = manager.last_acknowledged()
    record = yield client.create_kernel("late", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield blocking(scenario.reactor, agent.docker.kill, record["container_id"])
    manager.expect("kernel-terminated", "late", {"self-terminated"}, exit_code=137, after=seen)
    ended = yield manager.wait_for("kernel-terminated", "late")
    assert ended["data"]["reason"] == "self-terminated", manager.report()


@pytest_twisted.inlineCallbacks
def test_kernels_that_die_with_docker_are_reported_once_and_cleaned(private_scenario, private_dockerd, reactor):
    scenario = private_scenario
    agent = scenario.new_agent("dockerdown")
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    for kernel_id in ("k1", "k2"):
        yield client.create_kernel(kernel_id, scenario.image, {"cpu": 0.5, "mem": "64m"})
    seen = manager.last_acknowledged()

    yield check_outage_and_return(reactor, private_dockerd, agent, live_restore=False)
    for kernel_id in ("k1", "k2"):
        manager.expect("kernel-terminated", kernel_id, after=seen)
        yield manager.wait_for("kernel-terminated", kernel_id)
    client = yield scenario.connect(agent)
    assert (yield client.list_kernels()) == []
    used = yield scenario.grants_used(client)
    assert used["cpu"] == 0 and used["mem"] == 0
    yield wait_until_blocking(
        reactor, lambda: agent.docker.agent_containers(agent.agent_id) == [], 30, "the dead kernels' containers removed"
    )
    assert scenario.stray_dirs(agent) == []

    yield check_events_stream_is_back(scenario, client, manager, agent)
    yield manager.settle()
    for kernel_id in ("k1", "k2", "late"):
        assert len(manager.terminations(kernel_id)) == 1, manager.report()
    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []


@pytest_twisted.inlineCallbacks
def test_kernels_survive_a_live_restore_restart(private_scenario, private_dockerd, reactor):
    scenario = private_scenario
    yield blocking(reactor, private_dockerd.restart, True)
    agent = scenario.new_agent("liverestore")
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    record = yield client.create_kernel("k1", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client.execute("k1", "query", "x = 41")
    seen = manager.last_acknowledged()

    yield check_outage_and_return(reactor, private_dockerd, agent, live_restore=True)
    client = yield scenario.connect(agent)
    assert kernel_ids((yield client.list_kernels())) == ["k1"]
    assert (yield blocking(reactor, agent.docker.running, record["container_id"]))
    assert (yield scenario.check_survivor(client, "k1"))

    yield check_events_stream_is_back(scenario, client, manager, agent)
    yield manager.settle()
    assert manager.terminations("k1") == [], manager.report()
    assert [e["kernel_id"] for e in manager.events("kernel-terminated") if e["seq"] > seen] == ["late"]
    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []


def test_the_private_daemon_shares_nothing_with_the_system_one(private_dockerd, docker_host, kernel_image):
    private, system = DockerAPI(private_dockerd.host), DockerAPI(docker_host)
    label = {"ai.backend.agent-id": f"separate-{private_dockerd.pid}"}
    container = private.create(kernel_image, label)
    try:
        assert [c["Id"] for c in private.containers(label)] == [container]
        assert system.containers(label) == []
        pid = private.inspect(container)["State"]["Pid"]
        with open(f"/proc/{pid}/cgroup") as cgroups:
            assert f"/{private_dockerd.name}/" in cgroups.read()  # its own cgroup parent
        private_dockerd.stop()
        assert system.has_image(kernel_image)  # the system daemon answers on, untouched
        private_dockerd.start()
        # Without live-restore a stopping daemon stops its containers; they stay listed.
        assert not private.running(container)
    finally:
        private.remove(container)
    assert private.containers(label) == []
