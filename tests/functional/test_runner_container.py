"""
The runner where it really runs: the main process of a kernel container made from the
local kernel image (Debian python3-minimal: no json, getpass or rlcompleter there), with
no network, reduced capabilities, no-new-privileges, the runner directory mounted
read-only, and the socket and home directories bind-mounted from the host.
"""

import os
import shutil
import signal
import stat
import tempfile
import time

import pytest
import pytest_twisted

import bai_agent.runner
from bai_agent.kernels.runner_link import connect_runner
from bai_agent.testing.docker_cli import docker
from tests.functional.runner_process import Client

pytestmark = pytest.mark.functional

KERNEL_IMAGE = "bai-kernel/python:3.11"
KERNEL_UID = 1000
CAPABILITIES = ["CHOWN", "SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER"]


class KernelContainer:
    def __init__(self, docker_host):
        self.docker_host = docker_host
        self.container_id = None
        self.base = tempfile.mkdtemp(prefix="bai-runner-container-")
        os.chmod(self.base, 0o755)
        self.state_dir = os.path.join(self.base, "state")
        os.mkdir(self.state_dir, 0o700)
        self.home = os.path.join(self.base, "home")
        os.mkdir(self.home, 0o755)
        os.chown(self.home, KERNEL_UID, KERNEL_UID)
        self.socket_path = os.path.join(self.state_dir, "runner.sock")

    def start(self):
        if docker("image", "inspect", KERNEL_IMAGE, docker_host=self.docker_host, check=False).returncode != 0:
            pytest.fail(
                f"the kernel image {KERNEL_IMAGE} is missing: build it with scripts/build-kernel-image",
                pytrace=False,
            )
        args = ["run", "-d", "--network", "none", "--cap-drop", "ALL"]
        for capability in CAPABILITIES:
            args += ["--cap-add", capability]
        args += [
            "--security-opt",
            "no-new-privileges",
            "--pids-limit",
            "256",
            "--label",
            "bai-agent-test=runner",
            "-v",
            f"{bai_agent.runner.RUNNER_DIR}:{bai_agent.runner.MOUNT_POINT}:ro",
            "-v",
            f"{self.state_dir}:{bai_agent.runner.STATE_MOUNT_POINT}",
            "-v",
            f"{self.home}:/home/work",
            KERNEL_IMAGE,
        ]
        args += bai_agent.runner.runner_command(uid=KERNEL_UID, gid=KERNEL_UID)
        self.container_id = docker(*args, docker_host=self.docker_host).stdout.strip()

    def wait_for_socket(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if time.monotonic() > deadline:
                raise AssertionError(f"no runner socket after {timeout}s; container log:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self):
        if self.container_id is None:
            return ""
        result = docker("logs", self.container_id, docker_host=self.docker_host, check=False)
        return result.stdout + result.stderr

    def state(self):
        return docker(
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            self.container_id,
            docker_host=self.docker_host,
        ).stdout.split()

    def remove(self):
        try:
            if self.container_id is not None:
                docker("rm", "-f", self.container_id, docker_host=self.docker_host, check=False)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def container(docker_host):
    kernel = KernelContainer(docker_host)
    try:
        kernel.start()
        yield kernel
    finally:
        kernel.remove()


@pytest.fixture
def client(container):
    container.wait_for_socket()
    c = Client(container.socket_path, timeout=30)
    yield c
    c.close()


def test_user_code_runs_as_uid_1000_in_the_container(client):
    assert client.hello["python"] == "3.11.2"
    assert client.hello["pid"] == 1  # the runner is the container's main process
    result = client.run("import os; print(os.getuid(), os.getgid(), os.getgroups())")
    assert (result.stdout, result.exit_code) == ("1000 1000 []\n", 0)
    assert client.run("import os\nos.getcwd(), os.environ['HOME']").stdout == "('/home/work', '/home/work')\n"


def test_the_socket_is_root_only(container, client):
    mode = os.stat(container.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_file_written_by_user_code_lands_in_the_host_home_owned_by_1000(container, client):
    assert client.run("with open('note.txt', 'w') as f: f.write('from the kernel')").exit_code == 0
    path = os.path.join(container.home, "note.txt")
    with open(path) as f:
        assert f.read() == "from the kernel"
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (KERNEL_UID, KERNEL_UID)


def test_user_code_cannot_reach_the_runner(client):
    result = client.run(
        "import os, signal, socket\n"
        "for attempt in ("
        "    lambda: open('/run/bai/runner.sock', 'rb'),"
        "    lambda: socket.socket(socket.AF_UNIX).connect('/run/bai/runner.sock'),"
        "    lambda: os.listdir('/run/bai'),"
        "    lambda: os.kill(1, signal.SIGTERM),"
        "):\n"
        "    try:\n"
        "        attempt()\n"
        "        print('allowed')\n"
        "    except PermissionError:\n"
        "        print('denied')\n"
    )
    assert result.stdout == "denied\n" * 4
    assert client.run("print('runner fine')").stdout == "runner fine\n"


def test_interrupt_in_the_container(client):
    client.run("kept = 1")
    run_id = client.start("while True: pass")
    time.sleep(0.5)
    client.send({"type": "interrupt"})
    assert client.recv_type("interrupt-result")[0]["ok"] is True
    result = client.collect(run_id)
    assert result.exit_code == 130
    assert "KeyboardInterrupt" in result.stderr
    assert client.run("print(kept)").stdout == "1\n"


def test_minimal_python_gets_input_getpass_and_completions(client):
    run_id = client.start("import getpass\nprint(len(getpass.getpass('pin? ')), input('name? '))")
    waiting = client.collect(run_id, until=("waiting-input",)).messages[-1]
    assert (waiting["prompt"], waiting["is_password"]) == ("pin? ", True)
    client.send({"type": "input", "run_id": run_id, "data": "1234"})
    waiting = client.collect(run_id, until=("waiting-input",)).messages[-1]
    assert (waiting["prompt"], waiting["is_password"]) == ("name? ", False)
    client.send({"type": "input", "run_id": run_id, "data": "ann"})
    assert client.collect(run_id).stdout == "4 ann\n"
    client.run("import os")
    client.send({"type": "complete", "id": 1, "text": "os.pa"})
    assert "os.path" in client.recv()["items"]


def test_crash_and_cancel_in_the_container(client):
    result = client.run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert result.exit_code == 128 + signal.SIGSEGV
    run_id = client.start("import time; time.sleep(60)")
    time.sleep(0.3)
    client.send({"type": "cancel", "run_id": run_id})
    assert client.collect(run_id).exit_code == 137
    assert client.run("print('fresh')").stdout == "fresh\n"


def test_batch_in_the_container(client):
    result = client.run("id -u; pwd", mode="batch", options={"build": "echo compiled > out.txt", "exec": None})
    assert result.types()[0] == "build-finished" and set(result.types()[1:-1]) == {"output"}
    assert (result.stdout, result.exit_code) == ("1000\n/home/work\n", 0)
    result = client.run(mode="batch", options={"exec": "cat out.txt; id -u"})
    assert (result.stdout, result.exit_code) == ("compiled\n1000\n", 0)


def test_output_flows_with_bounded_buffers(client):
    result = client.run("for i in range(200000): print('%09d' % i)", timeout=60)
    assert result.exit_code == 0
    assert result.stdout == "".join(f"{i:09d}\n" for i in range(200000))


def test_sigterm_ends_the_container_cleanly(container, client):
    client.run("import subprocess; p = subprocess.Popen(['sleep', '600'])")
    docker("kill", "--signal", "TERM", container.container_id, docker_host=container.docker_host)
    deadline = time.monotonic() + 20
    while container.state()[0] != "exited":
        assert time.monotonic() < deadline, "the runner did not stop on SIGTERM"
        time.sleep(0.1)
    assert container.state()[1] == "0"


@pytest_twisted.inlineCallbacks
def test_connect_runner_waits_for_the_container(reactor, container):
    # Connect at once: the runner is not listening yet, connect_runner retries.
    link = yield connect_runner(reactor, container.socket_path, reactor, timeout=30)
    try:
        assert link.hello["protocol"] == 1
        items = yield link.request_completions("pri", {})
        assert "print" in items
    finally:
        link.close()
