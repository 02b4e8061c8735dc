"""
Kernels whose user code attacks its own runner, on real Docker through a real agent: the
runner's socket, its parent processes, inherited file descriptors, endless lines, a fork
bomb, memory past the limit. After each attack the agent still serves a second kernel,
is healthy, and the attacked kernel either still works or is reported terminated, and is
destroyed without leaving a container.
"""

import textwrap
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.docker_cli import docker
from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import AgentProcess
from tests.functional.executing import IMAGE

pytestmark = pytest.mark.functional

AGENT_ID = "agent-ra"
PIDS_LIMIT = 64
BAD_LOG_LINES = ("Unhandled Error", "Unhandled error in Deferred", "failed unexpectedly")


def our_containers():
    return docker(
        "ps", "-aq", "--no-trunc", "--filter", f"label=ai.backend.agent-id={AGENT_ID}", check=False
    ).stdout.split()


@pytest.fixture(scope="module")
def agent(tmp_path_factory, etcd_server, docker_host):
    process = AgentProcess(
        tmp_path_factory.mktemp("attack"),
        etcd_server.addr,
        agent_id=AGENT_ID,
        extra=["--kernel-network", "none", "--kernel-pids-limit", str(PIDS_LIMIT)],
    ).start()
    process.wait_for(lambda: process.http("/healthz")[0] == 200, 15, "/healthz 200")
    yield process
    process.stop()
    for container in our_containers():
        docker("rm", "-f", container, check=False)
    process.remove_state()


@pytest.fixture
def client(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = pytest_twisted.blockon(AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret))
    client.events = []
    client.set_event_handler(client.events.append)
    pytest_twisted.blockon(client.subscribe(0))
    yield client
    pytest_twisted.blockon(client.reset())
    client.close()


@pytest_twisted.inlineCallbacks
def run_to_end(client, kernel_id, code, most_calls=400):
    """Execute a query and collect until it ends: (console text by stream, last answer)."""
    answer = yield client.execute(kernel_id, "query", code)
    console = list(answer["console"])
    calls = 1
    while answer["status"] == "continued" and calls < most_calls:
        answer = yield client.execute(kernel_id, "continue", run_id=answer["run_id"])
        console += answer["console"]
        calls += 1
    text = {"stdout": "", "stderr": ""}
    for kind, data in console:
        if kind in text:
            text[kind] += data
    return text, answer


def terminated(client, kernel_id):
    return [
        event for event in client.events if event["type"] == "kernel-terminated" and event["kernel_id"] == kernel_id
    ]


ATTACKS = {
    # The runner's socket lives in /run/bai, a 0700 root directory: uid 1000 can neither
    # list it nor connect. If it could, garbage must not hurt the agent.
    "runner-socket": """
        import os, socket
        for path in ("/run/bai", "/proc/1/fd", "/proc/1/root/run/bai"):
            try:
                print("listed", path, os.listdir(path))
            except OSError as e:
                print("list", path, type(e).__name__)
        for path in ("/run/bai/runner.sock", "/proc/1/root/run/bai/runner.sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError as e:
                print("connect", path, type(e).__name__)
            else:
                print("CONNECTED", path)
                s.sendall(b"\\x00\\x00\\x00\\x10{not json at all" + b"\\xff" * 100000)
                s.sendall(b"\\x00\\x00\\x00\\x0f" + b'{"type":"hello"')
            finally:
                s.close()
    """,
    # Signal everything visible, the parents first, then everything the user may signal.
    "kill-parents": """
        import os, signal
        me = os.getpid()
        print("uid", os.getuid(), "parent", os.getppid())
        for pid in [os.getppid(), 1] + sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
            if pid == me:
                continue
            for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                    print("signalled", pid, sig)
                except OSError as e:
                    pass
        try:
            os.kill(-1, signal.SIGKILL)  # every process uid 1000 may signal, but this one
        except OSError as e:
            print("kill -1", type(e).__name__)
    """,
    # Junk down every descriptor the interpreter holds (its channel to the runner
    # included: a length prefix of 2 GiB), then close them all.
    "file-descriptors": """
        import os
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        print("fds", fds, flush=True)
        for fd in fds:
            for junk in (b"\\x7f\\xff\\xff\\xff", b"\\x00\\x00\\x00\\x05{{{{{", b"\\xff" * 70000):
                try:
                    os.write(fd, junk)
                except OSError:
                    pass
        for fd in range(0, 256):
            try:
                os.close(fd)
            except OSError:
                pass
    """,
    # Output without a single newline, from Python and straight to the fds.
    "huge-lines": """
        import os, sys
        sys.stdout.write("x" * (12 << 20))
        sys.stdout.flush()
        written = os.write(2, b"y" * (3 << 20))
    """,
    # Every process forks until the pids limit says no, then waits a little and leaves.
    "fork-bomb": """
        import os, time
        forked, refused = 0, None
        for _ in range(100000):
            try:
                pid = os.fork()
            except OSError as e:
                refused = e.errno
                break
            if pid == 0:
                try:
                    while True:
                        os.fork()
                except OSError:
                    pass
                time.sleep(3)
                os._exit(0)
            forked += 1
        print("forked", forked, "refused", refused, flush=True)
        time.sleep(4)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    """,
    # Far past the 128 MiB limit.
    "memory": """
        blocks = []
        while True:
            blocks.append(bytearray(16 << 20))
    """,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest_twisted.inlineCallbacks
def test_an_attacked_runner_leaves_the_agent_serving(agent, client, reactor, attack):
    healthy = yield client.create_kernel("healthy", IMAGE, {"cpu": 0.5, "mem": "128m"})
    yield client.create_kernel("victim", IMAGE, {"cpu": 0.5, "mem": "128m"})
    started = time.monotonic()
    try:
        text, answer = yield run_to_end(client, "victim", textwrap.dedent(ATTACKS[attack]))
    except (errors.KernelNotRunning, errors.KernelNotFound) as e:
        text, answer = None, e
    print(
        attack,
        "took",
        round(time.monotonic() - started, 1),
        "s:",
        answer if text is None else (answer.get("exit_code"), text["stdout"][-300:], text["stderr"][-600:]),
    )

    # What each attack must not achieve.
    if attack == "runner-socket":
        assert text is not None and "CONNECTED" not in text["stdout"], text
        assert "listed /run/bai" not in text["stdout"], text
    elif attack == "huge-lines":
        assert text is not None and answer["status"] == "finished", answer
        assert text["stdout"] == "x" * (12 << 20)
        assert text["stderr"] == "y" * (3 << 20)
    elif attack == "fork-bomb" and text is not None:
        forked = [line for line in text["stdout"].splitlines() if line.startswith("forked")]
        assert forked and int(forked[0].split()[1]) < PIDS_LIMIT, text["stdout"][-500:]

    # The agent serves everyone else: a second kernel runs code, /healthz is fine.
    other, _ = yield run_to_end(client, "healthy", "print(1)")
    assert other["stdout"] == "1\n"
    status, body = yield deferToThread(agent.http, "/healthz")
    assert status == 200, body
    assert agent.process.poll() is None

    # The attacked kernel still works, or was reported terminated.
    try:
        again, answer = yield run_to_end(client, "victim", "print(2)")
        works = again["stdout"] == "2\n"
    except (errors.KernelNotRunning, errors.KernelNotFound):
        works = False
    if not works:
        deadline = time.monotonic() + 30
        while not terminated(client, "victim") and time.monotonic() < deadline:
            yield sleep(reactor, 0.2)
        assert terminated(client, "victim"), f"victim neither works nor was reported terminated: {client.events[-5:]}"
    try:
        yield client.destroy_kernel("victim")
    except errors.KernelNotFound:
        assert terminated(client, "victim")
    assert our_containers() == [healthy["container_id"]]
    log = agent.log_text()
    for line in BAD_LOG_LINES:
        assert line not in log, log[log.index(line) - 2000 : log.index(line) + 2000]
