"""
A real etcd server for tests: one member on free loopback ports with its own data dir.

Blocking calls (subprocess, urllib, sleep) are fine here: this runs in test set-up and
tear-down, outside the reactor's work.
"""

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ETCD_BINARY = "/usr/bin/etcd"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class EtcdServerError(RuntimeError):
    """The etcd server could not be started."""


def _free_loopback_port(taken=()):
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


class EtcdServer:
    """
    One etcd member listening on ``127.0.0.1``. Ports are picked on the first ``start()``
    and kept for the lifetime of the object, so ``restart()`` brings the server back at
    the same address.
    """

    def __init__(self, data_dir, binary=ETCD_BINARY):
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.client_port = None
        self.peer_port = None
        self._process = None
        self._log_file = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def addr(self):
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self):
        return self.data_dir / "etcd.log"

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    def start(self):
        if self.running:
            return
        if not os.access(self.binary, os.X_OK):
            raise EtcdServerError(
                f"etcd server binary {self.binary} not found: install the Debian package "
                "etcd-server (apt-get install etcd-server)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.client_port is None:
            self.client_port = _free_loopback_port()
            self.peer_port = _free_loopback_port(taken=(self.client_port,))
        client_url = self.url
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name",
            "default",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            "default=" + peer_url,
            "--initial-cluster-state",
            "new",
            "--log-outputs",
            "stderr",
        ]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(("\n=== starting: " + " ".join(command) + "\n").encode())
        self._log_file.flush()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self):
        assert self._process is not None, "start() runs etcd first"
        deadline = time.monotonic() + START_TIMEOUT
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise EtcdServerError(
                    f"etcd exited with status {exit_code} while starting; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1.0) as answer:
                    body = answer.read()
                if b'"true"' in body:
                    return
                last_problem = f"health answered {body!r}"
            except (OSError, urllib.error.URLError) as error:
                last_problem = str(error)
            time.sleep(0.05)
        raise EtcdServerError(
            f"etcd at {self.url} not healthy after {START_TIMEOUT:.0f}s ({last_problem}); log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines=30):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self, wipe=False):
        """Stop, optionally lose every key and lease, and start again on the same ports."""
        self.stop()
        if wipe:
            # Everything but our own log, which keeps the story of every start.
            for entry in self.data_dir.iterdir():
                if entry == self.log_path:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.start()
