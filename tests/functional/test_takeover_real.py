"""
A restarted agent never tells a manager that its living kernels are gone (PROTOCOL.md
section 6), even while the take-over is slow: here one kernel's runner is frozen
(SIGSTOP from the host), so reconnecting to it waits, and a manager that reconciles at once
must see every kernel, or ``BACKEND_UNAVAILABLE``, never a shorter list or
``KERNEL_NOT_FOUND``.
"""

import os
import signal
import time

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import docker, running_agent
from tests.functional.executing import IMAGE

pytestmark = pytest.mark.functional


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    with running_agent(tmp_path, etcd_server.addr, "agent-takeover") as process:
        yield process


def runner_pid(container_id) -> int:
    return int(docker("inspect", "-f", "{{.State.Pid}}", container_id).stdout.strip())


@pytest_twisted.inlineCallbacks
def connect_when_listening(reactor, agent, secret, deadline):
    while True:
        try:
            client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret, timeout=2)
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            yield sleep(reactor, 0.02)


@pytest_twisted.inlineCallbacks
def test_a_manager_reconciling_right_after_a_restart_never_sees_a_living_kernel_gone(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    # Docker lists the newest container first: a take-over that adopts one kernel after the
    # other would wait on the frozen one before it even looks at the lively one.
    yield client.create_kernel("lively", IMAGE, {"cpu": 0.5, "mem": "64m"})
    frozen = yield client.create_kernel("frozen", IMAGE, {"cpu": 0.5, "mem": "64m"})
    client.close()
    pid = runner_pid(frozen["container_id"])

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    os.kill(pid, signal.SIGSTOP)  # its runner cannot answer the next agent for now
    try:
        agent.start()
        deadline = time.monotonic() + 20
        client = yield connect_when_listening(reactor, agent, secret, deadline)
        answers = []
        lively_ran = False
        # Reconcile as a manager would, over and over, for a few seconds of the take-over.
        until = time.monotonic() + 4
        while time.monotonic() < until:
            try:
                kernels = yield client.list_kernels()
                answers.append(sorted(k["kernel_id"] for k in kernels))
            except errors.BackendUnavailable:
                answers.append("unavailable")
            for kernel_id in ("frozen", "lively"):
                try:
                    yield client.get_kernel_stats(kernel_id)
                except errors.BackendUnavailable:
                    pass  # may be said; "gone" may not
            try:
                answer = yield client.execute("lively", "query", "print(6 * 7)")
                lively_ran = lively_ran or answer["console"] == [["stdout", "42\n"]]
            except errors.BackendUnavailable:
                pass
            yield sleep(reactor, 0.05)
        lists = [answer for answer in answers if answer != "unavailable"]
        assert lists, answers
        assert all(listed == ["frozen", "lively"] for listed in lists), answers
        # The slow runner holds up only its own kernel.
        assert lively_ran
        info = yield client.get_agent_info()
        assert info["taking_over"] is True
        assert agent.http("/healthz")[0] == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    # Once it answers again, it is adopted like the other one.
    until = time.monotonic() + 40
    while True:
        try:
            answer = yield client.execute("frozen", "query", "print('thawed')")
            break
        except errors.BackendUnavailable:
            assert time.monotonic() < until, "the frozen kernel was never adopted"
            yield sleep(reactor, 0.2)
    assert answer["console"] == [["stdout", "thawed\n"]]
    info = yield client.get_agent_info()
    assert info["taking_over"] is False
    yield client.reset()
    client.close()


@pytest_twisted.inlineCallbacks
def test_stopping_while_a_runner_is_being_reached_is_clean_and_quick(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    frozen = yield client.create_kernel("frozen", IMAGE, {"cpu": 0.5, "mem": "64m"})
    client.close()
    pid = runner_pid(frozen["container_id"])
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    os.kill(pid, signal.SIGSTOP)
    try:
        agent.start()
        client = yield connect_when_listening(reactor, agent, secret, time.monotonic() + 20)
        client.close()
        # The reconnection would wait 30 s for the frozen runner; a stop cancels it
        # (and is not killed for taking longer than its supervisor would wait).
        assert agent.stop(signal.SIGTERM, timeout=25) == 0
        log = agent.log_text()
        assert "Unhandled error in Deferred" not in log, log[-3000:]
    finally:
        os.kill(pid, signal.SIGCONT)
    agent.start()
    agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 20, "/healthz 200 once the runner answers")
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    kernels = yield client.list_kernels()
    assert [k["kernel_id"] for k in kernels] == ["frozen"]
    yield client.reset()
    client.close()
