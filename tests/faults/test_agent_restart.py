"""
The agent process dies (SIGKILL) or is stopped (SIGTERM) with kernels running, and comes
back with the same id, state dir and scratch root: it takes over its own kernels and
nothing else.
"""

import signal

import pytest
import pytest_twisted

from bai_agent.testing.waiting import wait_until_blocking
from tests.faults.helpers import AGENT_ID_LABEL, KERNEL_ID_LABEL, by_id, kernel_ids

pytestmark = pytest.mark.faults


KERNELS = {
    "keep-a": {"cpu": 1, "mem": "128m"},
    "keep-b": {"cpu": 0.5, "mem": "64m"},
    "dies": {"cpu": 0.5, "mem": "64m"},
}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
@pytest_twisted.inlineCallbacks
def test_restarted_agent_takes_over_its_kernels(scenario, sig):
    agent = scenario.new_agent("restart")
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    for kernel_id, resources in KERNELS.items():
        yield client.create_kernel(kernel_id, scenario.image, resources)
        answer = yield client.execute(kernel_id, "query", "x = 41")
        assert answer["status"] == "finished"
    before = by_id((yield client.list_kernels()))
    used_before = yield scenario.grants_used(client)
    dies_grant = before["dies"]["resources"]
    started_before = len(manager.events("agent-started"))
    seen = manager.last_acknowledged()

    code = yield scenario.stop_async(agent, sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    # Killed while nobody watched: the agent must find out on its own.
    agent.docker.kill(before["dies"]["container_id"])
    assert agent.docker.running(before["keep-a"]["container_id"])

    yield scenario.start_async(agent)
    client = yield scenario.connect(agent)
    after = by_id((yield client.list_kernels()))
    assert sorted(after) == ["keep-a", "keep-b"]
    for kernel_id in after:
        assert after[kernel_id]["status"] == "running"
        assert after[kernel_id]["container_id"] == before[kernel_id]["container_id"]
        assert after[kernel_id]["resources"] == before[kernel_id]["resources"]
    used_after = yield scenario.grants_used(client)
    assert used_after["cpu"] == pytest.approx(used_before["cpu"] - dies_grant["cpu"])
    assert used_after["mem"] == used_before["mem"] - dies_grant["mem"]
    assert used_after["cuda.device"] == used_before["cuda.device"]
    for kernel_id in ("keep-a", "keep-b"):
        assert (yield scenario.check_survivor(client, kernel_id)), f"{kernel_id} did not survive"

    manager.expect("kernel-terminated", "dies", {"self-terminated"}, exit_code=137, after=seen)
    manager.expect("agent-started", after=seen)
    if sig == signal.SIGTERM:
        manager.expect("agent-stopping", after=seen)
    yield manager.settle()
    assert len(manager.terminations("dies")) == 1, manager.report()
    assert [e["kernel_id"] for e in manager.events("kernel-terminated")] == ["dies"], manager.report()
    assert len(manager.events("agent-started")) == started_before + 1
    assert scenario.stray_dirs(agent, after) == []

    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert manager.missing() == [] and manager.gaps() == [] and manager.conflicts == [], manager.report()
    assert scenario.figures.problems() == []


@pytest_twisted.inlineCallbacks
def test_leftovers_of_an_interrupted_create_are_removed_and_others_untouched(scenario):
    """
    What a create killed half-way leaves (a labelled container the agent never saved, a
    scratch dir with no container) is removed at the next start and reported
    ``orphan-cleanup``; another agent's container and an unlabelled one are left alone.
    """
    agent = scenario.new_agent("orphans")
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    yield client.create_kernel("keep", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client.execute("keep", "query", "x = 41")
    seen = manager.last_acknowledged()
    assert (yield scenario.stop_async(agent, signal.SIGKILL)) == -signal.SIGKILL

    docker = agent.docker
    half = docker.create(
        scenario.image,
        {AGENT_ID_LABEL: agent.agent_id, KERNEL_ID_LABEL: "half"},
        name=f"kernel.{agent.agent_id}.half",
    )
    (agent.scratch_root / "half").mkdir(mode=0o700)
    (agent.scratch_root / "half" / "partial.txt").write_text("left by a create that never finished")
    (agent.scratch_root / "home-only").mkdir(mode=0o700)
    other_id = f"other-{scenario.token}"
    other = docker.create(scenario.image, {AGENT_ID_LABEL: other_id, KERNEL_ID_LABEL: "half"})
    unlabelled = docker.create(scenario.image, {})
    no_kernel_label = docker.create(scenario.image, {AGENT_ID_LABEL: agent.agent_id})
    scenario.strays += [(docker, other), (docker, unlabelled), (docker, no_kernel_label)]

    yield scenario.start_async(agent)
    client = yield scenario.connect(agent)
    assert kernel_ids((yield client.list_kernels())) == ["keep"]
    assert (yield scenario.check_survivor(client, "keep"))
    assert docker.inspect(half) is None
    assert scenario.stray_dirs(agent, ["keep"]) == []
    for container in (other, unlabelled, no_kernel_label):
        assert docker.running(container), f"{container[:12]} was touched"
    manager.expect("kernel-terminated", "half", {"orphan-cleanup"}, after=seen)
    manager.expect("kernel-terminated", "home-only", {"orphan-cleanup"}, after=seen)
    yield manager.settle()
    assert len(manager.terminations("half")) == 1 and len(manager.terminations("home-only")) == 1
    assert manager.terminations("keep") == []

    # The other agent's container and the one without a kernel id stay out of the count.
    docker.remove(no_kernel_label)
    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert docker.running(other) and docker.running(unlabelled)
    assert scenario.figures.problems() == []


@pytest_twisted.inlineCallbacks
def test_agent_killed_during_create_leaves_a_kernel_or_nothing(scenario, reactor):
    """
    SIGKILL while CreateKernel runs (once Docker has the container, before the runner
    answered): the next start either adopts the kernel, which then works, or removes
    everything of it and says so with ``kernel-terminated``.
    """
    agent = scenario.new_agent("midcreate")
    manager = scenario.recorder(agent)
    yield manager.connect()
    client = yield scenario.connect(agent)
    pending = client.create_kernel("torn", scenario.image, {"cpu": 0.5, "mem": "64m"})
    pending.addErrback(lambda failure: None)  # the connection dies with the agent
    name = f"kernel.{agent.agent_id}.torn"
    docker = agent.docker

    def container_made():
        return any(f"/{name}" in (c.get("Names") or []) for c in docker.containers({AGENT_ID_LABEL: agent.agent_id}))

    yield wait_until_blocking(reactor, container_made, 30, "the container of the create")
    agent.process.send_signal(signal.SIGKILL)
    assert (yield scenario.stop_async(agent)) == -signal.SIGKILL
    yield manager.wait_for("kernel-creating", "torn")
    seen = manager.last_acknowledged()

    yield scenario.start_async(agent)
    client = yield scenario.connect(agent)
    listed = kernel_ids((yield client.list_kernels()))
    if listed == ["torn"]:
        assert (yield client.execute("torn", "query", "x = 41"))["status"] == "finished"
        assert (yield scenario.check_survivor(client, "torn"))
        # A manager that saw kernel-creating must learn that the kernel runs after all.
        manager.expect("kernel-started", "torn")
    else:
        assert listed == []
        assert docker.agent_containers(agent.agent_id) == []
        assert scenario.stray_dirs(agent) == []
        manager.expect(
            "kernel-terminated", "torn", {"orphan-cleanup", "self-terminated", "creation-failed"}, after=seen
        )
    yield manager.settle()
    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert manager.missing() == [] and manager.gaps() == [], manager.report()
    assert scenario.figures.problems() == []
