"""
The runner as a real process on the host (``RunnerProcess``: the runner directory copied
alone to a temporary place, as it is mounted alone in containers), a small blocking client
for its socket (``Client``), for the runner's tests (the ``runner`` fixture is in conftest.py).

User code runs as uid 1000 (the kernel user) when the tests run as root, else as the
current user.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import bai_agent.runner
from bai_agent.runner.framing import FrameDecoder, encode

RUNTIME = "/usr/bin/python3"  # what kernel images have; readable by uid 1000
USER_UID = 1000 if os.geteuid() == 0 else os.getuid()
USER_GID = 1000 if os.geteuid() == 0 else os.getgid()
RUNNER_MODULES = sorted(name for name in os.listdir(bai_agent.runner.RUNNER_DIR) if name.endswith(".py"))


def require_runtime():
    if not os.access(RUNTIME, os.X_OK):
        pytest.fail(f"these tests need {RUNTIME} (the interpreter kernels run)", pytrace=False)


# -- a runner process and a blocking client --------------------------------------------


class RunnerProcess:
    """The runner started from a private copy of its directory, with its own home."""

    def __init__(self, runtime_type="python", outbox_limit=None):
        require_runtime()
        self.base = tempfile.mkdtemp(prefix="bai-runner-test-")
        os.chmod(self.base, 0o755)  # uid 1000 must reach home/ and runner/
        self.runner_dir = os.path.join(self.base, "runner")
        os.mkdir(self.runner_dir)
        for name in RUNNER_MODULES:
            shutil.copy(os.path.join(bai_agent.runner.RUNNER_DIR, name), self.runner_dir)
        self.state_dir = os.path.join(self.base, "state")
        os.mkdir(self.state_dir, 0o700)
        self.home = os.path.join(self.base, "home")
        os.mkdir(self.home, 0o755)
        os.chown(self.home, USER_UID, USER_GID)
        self.socket_path = os.path.join(self.state_dir, "runner.sock")
        self.log_path = os.path.join(self.base, "runner.log")
        argv = [
            sys.executable,
            "-I",
            "-u",
            os.path.join(self.runner_dir, "main.py"),
            "--socket",
            self.socket_path,
            "--uid",
            str(USER_UID),
            "--gid",
            str(USER_GID),
            "--home",
            self.home,
            "--runtime-type",
            runtime_type,
            "--runtime-path",
            RUNTIME,
        ]
        if outbox_limit is not None:
            argv += ["--outbox-limit", str(outbox_limit)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the runner did not start:\n" + self.log())
            time.sleep(0.02)

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def peak_rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def children(self):
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except FileNotFoundError:
            return []

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)


class Result:
    def __init__(self, messages):
        self.messages = messages
        self.outputs = [(m["stream"], m["data"]) for m in messages if m["type"] == "output"]
        last = messages[-1]
        self.exit_code = last.get("exit_code") if last["type"] == "finished" else None

    @property
    def stdout(self):
        return "".join(data for stream, data in self.outputs if stream == "stdout")

    @property
    def stderr(self):
        return "".join(data for stream, data in self.outputs if stream == "stderr")

    def types(self):
        return [m["type"] for m in self.messages]


class Client:
    """A blocking agent: connect, frame, collect the messages of a run."""

    def __init__(self, path, handshake=True, timeout=20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self.queue = []
        self.hello = None
        self._runs = 0
        if handshake:
            self.hello = self.recv()
            assert self.hello["type"] == "hello"
            self.send({"type": "hello", "protocol": 1})

    def send(self, message):
        self.sock.sendall(encode(message))

    def recv(self, timeout=None):
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the runner closed the connection")
            self.queue.extend(self.decoder.feed(data))
        return self.queue.pop(0)

    def recv_type(self, kind, timeout=None):
        """The next message of ``kind``, skipping others (returned too, for checks)."""
        skipped = []
        while True:
            message = self.recv(timeout)
            if message["type"] == kind:
                return message, skipped
            skipped.append(message)

    def start(self, code="", mode="query", options=None, run_id=None):
        self._runs += 1
        run_id = run_id or f"run-{self._runs}"
        message = {"type": "execute", "run_id": run_id, "mode": mode, "code": code}
        if options is not None:
            message["options"] = options
        self.send(message)
        return run_id

    def collect(self, run_id, until=("finished",), timeout=None):
        messages = []
        while True:
            message = self.recv(timeout)
            if message.get("run_id") == run_id or message["type"] == "error":
                messages.append(message)
                if message["type"] in until or message["type"] == "error":
                    return Result(messages)

    def run(self, code="", mode="query", options=None, timeout=None):
        return self.collect(self.start(code, mode, options), timeout=timeout)

    def is_closed(self, timeout=5.0):
        """True when the runner closes this connection (after what it had to say)."""
        try:
            while True:
                self.recv(timeout)
        except (EOFError, ConnectionResetError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()
