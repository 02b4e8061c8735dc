"""
A manager's connection breaks (aborted: no goodbye, nothing flushed) right after it sent a
command. On the agent's side the command completes or rolls back, whole: a second
manager finds the kernel running and usable, or gone with its container and scratch dir,
and the grants add up. The first manager, reconnecting with ``Subscribe(since=<the last
event it acknowledged>)``, gets every event it had not acknowledged.
"""

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.testing.waiting import sleep, wait_until
from tests.faults.helpers import by_id

pytestmark = pytest.mark.faults


RESOURCES = {"cpu": 0.5, "mem": "64m"}
SLOW_CODE = (
    "open('started', 'w').close()\nimport time\ntime.sleep(1)\ny = x + 1\nopen('finished', 'w').close()\nprint('done')"
)
UPLOAD = bytes(range(256)) * 4096  # 1 MiB, the most one UploadFile carries


@pytest_twisted.inlineCallbacks
def settled_kernels(reactor, client, timeout=60):
    """ListKernels once no kernel is between states."""
    deadline = reactor.seconds() + timeout
    while True:
        kernels = by_id((yield client.list_kernels()))
        if all(kernel["status"] == "running" for kernel in kernels.values()):
            return kernels
        if reactor.seconds() > deadline:
            raise AssertionError(f"kernels still between states: {kernels}")
        yield sleep(reactor, 0.1)


@pytest_twisted.inlineCallbacks
def execute_when_free(reactor, client, kernel_id, code, timeout=30):
    """Execute, retrying while the run of the dropped call still holds the kernel."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            answer = yield client.execute(kernel_id, "query", code)
            return answer
        except errors.RunConflict:
            if reactor.seconds() > deadline:
                raise
            yield sleep(reactor, 0.1)


@pytest.mark.parametrize("command", ["create", "destroy", "execute", "upload"])
@pytest_twisted.inlineCallbacks
def test_a_command_whose_manager_vanished_completes_or_rolls_back(scenario, reactor, command):
    agent = scenario.new_agent(f"drop-{command}")
    manager = scenario.recorder(agent, "dropped manager")
    dropped = yield manager.connect()
    observer = yield scenario.connect(agent)
    idle = yield scenario.grants_used(observer)
    if command != "create":
        yield observer.create_kernel("k", scenario.image, RESOURCES)
        yield observer.execute("k", "query", "x = 41")
        yield manager.wait_for("kernel-started", "k")
    acknowledged = manager.last_acknowledged()
    home = agent.scratch_root / "k"

    manager.hold()  # events from here on are received, never acknowledged
    if command == "create":
        pending = dropped.create_kernel("k", scenario.image, RESOURCES)
        yield wait_until(
            reactor, lambda: any(e["type"] == "kernel-creating" for e in manager.held.values()), 30, "kernel-creating"
        )
    elif command == "destroy":
        pending = dropped.destroy_kernel("k")
        yield sleep(reactor, 0.2)
    elif command == "execute":
        pending = dropped.execute("k", "query", SLOW_CODE, run_id="dropped-run", options={"flush_timeout": 60})
        yield wait_until(reactor, lambda: (home / "started").exists(), 30, "the run to start")
    else:
        pending = dropped.upload_file("k", "upload.bin", UPLOAD)
        yield sleep(reactor, 0)
    pending.addErrback(lambda failure: None)  # its answer has nowhere to go
    manager.abort()

    kernels = yield settled_kernels(reactor, observer)
    used = yield scenario.grants_used(observer)
    containers = agent.docker.agent_containers(agent.agent_id)
    if "k" in kernels:
        assert command != "destroy", "a destroy the agent received must complete"
        assert [c[:12] for c in containers] == [kernels["k"]["container_id"][:12]]
        assert agent.docker.running(containers[0])
        assert home.is_dir()
        assert used["cpu"] == pytest.approx(idle["cpu"] + 0.5) and used["mem"] == idle["mem"] + (64 << 20)
        if command == "create":
            assert (yield observer.execute("k", "query", "x = 41"))["status"] == "finished"
        if command == "execute":
            yield wait_until(reactor, lambda: (home / "finished").exists(), 30, "the dropped run to finish")
            answer = yield execute_when_free(reactor, observer, "k", "print(y)")
            assert answer["console"] == [["stdout", "42\n"]]
        if command == "upload":
            # Whole or not at all, never part of it.
            names = sorted(entry.name for entry in home.iterdir())
            assert names in ([], ["upload.bin"]), names
            if names:
                assert (home / "upload.bin").read_bytes() == UPLOAD
        assert (yield scenario.check_survivor(observer, "k"))
    else:
        assert command in ("create", "destroy")
        assert containers == []
        assert scenario.stray_dirs(agent) == []
        assert used["cpu"] == pytest.approx(idle["cpu"]) and used["mem"] == idle["mem"]

    # The dropped manager comes back and resumes after what it acknowledged.
    held = set(manager.held)
    manager.release()
    yield manager.connect()
    if command == "create":
        manager.expect("kernel-creating", "k", after=acknowledged)
        manager.expect("kernel-started" if "k" in kernels else "kernel-terminated", "k", after=acknowledged)
    if command == "destroy":
        manager.expect("kernel-terminated", "k", {"user-requested"}, after=acknowledged)
    yield manager.settle()
    assert held <= set(manager.by_seq), f"not redelivered: {sorted(held - set(manager.by_seq))}"
    assert manager.missing() == [] and manager.gaps() == [] and manager.conflicts == [], manager.report()

    leaks = yield scenario.clean_up(agent, [manager])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []
