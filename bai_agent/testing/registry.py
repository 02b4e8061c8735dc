"""
A real image registry for tests: Debian's ``docker-registry`` on a free loopback port, with
htpasswd (bcrypt) authentication and a temporary storage directory (Docker speaks plain
HTTP to registries on 127.0.0.0/8). ``push`` builds an image with a layer of its own (so a
pull really downloads), pushes it with the registry's credentials from a temporary Docker
CLI config, and removes it locally.

``GatedProxy`` stands between Docker and the registry, to make the registry die in the
middle of a download: once it has relayed ``cut_after`` bytes towards Docker it drops every
connection and refuses new ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

from bai_agent.testing.docker_cli import docker

USERNAME = "bai-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RegistryServer:
    def __init__(self, password: str) -> None:
        self.password = password
        self.username = USERNAME
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.work = tempfile.mkdtemp(prefix="bai-registry-")
        self.process: subprocess.Popen | None = None
        self.docker_config = os.path.join(self.work, "docker-config")

    def start(self) -> RegistryServer:
        for program in ("docker-registry", "htpasswd"):
            assert shutil.which(program), (
                f"{program} is missing (scripts/install-deps installs docker-registry and apache2-utils)"
            )
        htpasswd = os.path.join(self.work, "htpasswd")
        done = subprocess.run(
            ["htpasswd", "-Bbn", self.username, self.password], capture_output=True, text=True, check=True
        )
        with open(htpasswd, "w") as f:
            f.write(done.stdout)
        config = os.path.join(self.work, "config.yml")
        with open(config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: warn\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.work}/data\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.address}\n"
                f"auth:\n  htpasswd:\n    realm: bai-test\n    path: {htpasswd}\n"
            )
        self.log = open(os.path.join(self.work, "registry.log"), "wb")
        self.process = subprocess.Popen(
            ["docker-registry", "serve", config], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2)
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    break
            except OSError:
                pass
            assert self.process.poll() is None, f"docker-registry exited: {self.log_text()}"
            assert time.monotonic() < deadline, "docker-registry did not answer within 20s"
            time.sleep(0.1)
        os.makedirs(self.docker_config, exist_ok=True)
        login = subprocess.run(
            ["docker", "--config", self.docker_config, "login", "-u", self.username, "--password-stdin", self.address],
            input=self.password,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert login.returncode == 0, login.stderr
        return self

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.work, "registry.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def push(self, name: str, base: str, layer_bytes: int = 1 << 20, labels: dict[str, str] | None = None) -> str:
        """Build ``{address}/{name}`` from ``base`` plus a random layer, push it, remove it locally."""
        reference = f"{self.address}/{name}"
        context = tempfile.mkdtemp(prefix="bai-image-", dir=self.work)
        with open(os.path.join(context, "layer.bin"), "wb") as f:
            f.write(os.urandom(layer_bytes))
        lines = [f"FROM {base}", "COPY layer.bin /opt/layer.bin"]
        lines += [f'LABEL {key}="{value}"' for key, value in (labels or {}).items()]
        with open(os.path.join(context, "Dockerfile"), "w") as f:
            f.write("\n".join(lines) + "\n")
        build = subprocess.run(
            ["docker", "build", "-q", "-t", reference, context], capture_output=True, text=True, timeout=300
        )
        assert build.returncode == 0, build.stderr
        pushed = subprocess.run(
            ["docker", "--config", self.docker_config, "push", reference], capture_output=True, text=True, timeout=300
        )
        assert pushed.returncode == 0, pushed.stderr
        docker("rmi", reference)
        shutil.rmtree(context, ignore_errors=True)
        return reference

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None:
            self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


class GatedProxy:
    """A loopback TCP proxy to ``upstream`` that dies once ``cut_after`` bytes went downstream."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.sent = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while not self.cut.is_set():
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                if downstream:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent >= self.cut_after
                    if over:
                        self.kill()
                        return
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        """The registry dies: every connection is dropped and new ones are refused."""
        self.cut.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass
