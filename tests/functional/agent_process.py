"""Run a real agent (``python -m twisted bai-agent``) as a child process, for functional tests."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bai_agent.node import mounts
from bai_agent.testing.docker_cli import agent_containers as containers_of
from bai_agent.testing.docker_cli import docker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    environment = dict(os.environ)
    # The working tree first, so that twistd finds twisted/plugins/bai_agent_plugin.py here.
    environment["PYTHONPATH"] = REPO + os.pathsep + environment.get("PYTHONPATH", "")
    return environment


class AgentProcess:
    def __init__(self, tmp_path, etcd_addr, namespace="functional", agent_id="agent-f1", extra=()):
        self.amp_port = free_port()
        self.http_port = free_port()
        self.agent_id = agent_id
        self.namespace = namespace
        self.etcd_addr = etcd_addr
        self.log_path = tmp_path / f"{agent_id}.log"
        # Short, because runner sockets live under it (a UNIX socket path has 107 bytes).
        self.state_dir = pathlib.Path(tempfile.mkdtemp(prefix="bai-state-"))
        self.scratch_root = tmp_path / f"{agent_id}-scratch"
        self.argv = [
            sys.executable,
            "-m",
            "twisted",
            "bai-agent",
            "--etcd-addr",
            etcd_addr,
            "--namespace",
            namespace,
            "--agent-id",
            agent_id,
            "--amp-endpoint",
            f"tcp:{self.amp_port}:interface=127.0.0.1",
            "--advertise-host",
            "127.0.0.1",
            "--http-endpoint",
            f"tcp:{self.http_port}:interface=127.0.0.1",
            "--scratch-root",
            str(self.scratch_root),
            "--state-dir",
            str(self.state_dir),
            "--heartbeat-interval",
            "1",
            *extra,
        ]
        self.process = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env(), cwd=REPO, stdin=subprocess.DEVNULL
        )
        return self

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)
        finally:
            self.log.close()

    def failed_start(self, timeout=30) -> int:
        """Start an agent that is expected to refuse to start; its exit code (then cleaned up)."""
        self.start()
        try:
            return self.process.wait(timeout)
        finally:
            self.stop()
            self.remove_state()

    def remove_state(self):
        self.unmount_homes()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def unmount_homes(self):
        """
        Unmount what the agent left mounted below its scratch root: the homes of kernels it
        left running (``--scratch-type hostfile`` loop-mounts an image on each), once their
        containers are gone. Else every test that stops an agent with kernels alive leaves
        a mount and a loop device behind, and pytest's clean-up of old tmp dirs later
        empties them in place.
        """
        root = os.path.realpath(self.scratch_root)
        for point in mounts.mount_points_under(root):
            if point != root:
                try:
                    mounts.unmount(point, lazy=True)
                except OSError:
                    pass

    @property
    def secret_path(self):
        return self.state_dir / "secret"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, path):
        """(status, body) of a GET on the status page; (None, error) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError as e:
            return None, str(e).encode()

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.process.returncode} while waiting for {what}:\n{self.log_text()[-3000:]}"
                )
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_text()[-3000:]}")

    def ctl(self, *args, secret_file=None, stdin=None):
        argv = [sys.executable, "-m", "bai_agent.ctl", "--etcd-addr", self.etcd_addr, "--namespace", self.namespace]
        if secret_file:
            argv += ["--secret-file", str(secret_file)]
        return subprocess.run(
            argv + list(args), capture_output=True, text=True, env=env(), timeout=120, input=stdin or ""
        )


def etcd_record(etcd_url, key: str):
    """The JSON value of ``key`` in etcd (through the v3 gateway, stdlib only), or None."""
    import base64

    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/range",
        data=json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            document = json.load(response)
    except OSError:
        return None
    kvs = document.get("kvs") or []
    if not kvs:
        return None
    return json.loads(base64.b64decode(kvs[0]["value"]))


def etcd_put(etcd_url, key: str, value: str) -> None:
    """Put ``value`` at ``key`` in etcd (through the v3 gateway, stdlib only), as an operator would."""
    import base64

    body = {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()}
    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/put", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def etcd_delete(etcd_url, key: str) -> None:
    import base64

    body = {"key": base64.b64encode(key.encode()).decode()}
    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/deleterange", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


@contextlib.contextmanager
def running_agent(tmp_path, etcd_addr, agent_id, extra=()):
    """
    A healthy agent process whose kernels have no network; afterwards it is stopped and its
    containers and state are removed, whatever the test did.
    """
    process = AgentProcess(tmp_path, etcd_addr, agent_id=agent_id, extra=["--kernel-network", "none", *extra]).start()
    try:
        process.wait_for(lambda: process.http("/healthz")[0] == 200, 15, "/healthz 200")
        yield process
    finally:
        process.stop()
        for container in containers_of(agent_id):
            docker("rm", "-f", container, check=False)
        process.remove_state()
