"""
A private Docker daemon for tests that stop and start Docker: never the machine's own.

``PrivateDockerd`` runs its own ``containerd`` (own config, root, state and socket) and a
``dockerd`` pointed at it, with its own ``--data-root``, ``--exec-root``, ``--pidfile`` and
UNIX socket, no bridge, no iptables, no IP forwarding, and a config file of its own (so
``/etc/docker/daemon.json`` does not apply). Nothing it does touches the system daemon
or a system containerd: dockerd 20.10 would otherwise adopt ``/run/containerd/containerd.sock``
when one exists.

containerd lives on while dockerd is stopped, as with a packaged containerd service:
without ``--live-restore`` a stopping dockerd stops its containers; with it they keep
running and the next dockerd takes them back.

Every path lies under one short root directory (UNIX socket paths have 107 bytes).
Blocking (subprocess, sockets, sleep): for test set-up and tear-down only.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from urllib.parse import quote, urlencode

from bai_agent.docker.engine import image_path
from bai_agent.testing.docker_host import DEFAULT_DOCKER_HOST, docker_request

DOCKERD_BINARY = "/usr/sbin/dockerd"
CONTAINERD_BINARY = "/usr/bin/containerd"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: A stopping dockerd without live-restore gives each container this long after SIGTERM.
SHUTDOWN_TIMEOUT = 2
#: Longest root path that leaves room for the sockets under it (107 bytes in all).
MAX_ROOT_LENGTH = 60


class PrivateDockerError(RuntimeError):
    """The private daemon could not be started, stopped or used."""


class PrivateDockerd:
    """
    One dockerd (and its containerd) of the test's own, at ``host`` (``unix://...``).

    :param root: a short, empty or earlier-used directory for all of its state; a new
        ``/tmp/bdk-*`` directory when None. Reusing the root of an earlier instance
        reuses its images (a session loads the kernel image once).
    :param live_restore: start dockerd with ``--live-restore`` (``start()`` may change it).
    :param name: tells this daemon's containerd namespaces apart in logs.
    """

    def __init__(
        self, root=None, live_restore=False, name="bai-private", dockerd=DOCKERD_BINARY, containerd=CONTAINERD_BINARY
    ):
        self.root = os.path.abspath(root) if root else tempfile.mkdtemp(prefix="bdk-", dir="/tmp")
        if len(self.root) > MAX_ROOT_LENGTH:
            raise PrivateDockerError(
                f"the root {self.root!r} is too long for UNIX sockets under it (at most {MAX_ROOT_LENGTH} characters)"
            )
        self.live_restore = live_restore
        self.name = name
        self.dockerd_binary = dockerd
        self.containerd_binary = containerd
        self._dockerd = None
        self._containerd = None
        self._logs = []

    # -- paths ---------------------------------------------------------------------------

    @property
    def socket_path(self):
        return os.path.join(self.root, "d.sock")

    @property
    def host(self):
        """The ``DOCKER_HOST`` of this daemon."""
        return "unix://" + self.socket_path

    @property
    def containerd_socket(self):
        return os.path.join(self.root, "c.sock")

    @property
    def dockerd_log_path(self):
        return os.path.join(self.root, "dockerd.log")

    @property
    def containerd_log_path(self):
        return os.path.join(self.root, "containerd.log")

    @property
    def pid(self):
        """The dockerd's pid while it runs, else None."""
        return self._dockerd.pid if self._dockerd is not None and self.running else None

    @property
    def containerd_pid(self):
        return self._containerd.pid if self._containerd is not None and self._containerd.poll() is None else None

    @property
    def running(self):
        return self._dockerd is not None and self._dockerd.poll() is None

    # -- life ----------------------------------------------------------------------------

    def start(self, live_restore=None):
        """Start containerd (unless it runs) and dockerd; return once ``/_ping`` answers."""
        if live_restore is not None:
            self.live_restore = live_restore
        if self.running:
            return self
        for binary in (self.dockerd_binary, self.containerd_binary):
            if not os.access(binary, os.X_OK):
                raise PrivateDockerError(
                    f"{binary} not found: install the Debian package docker.io (it brings containerd and runc)"
                )
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._start_containerd()
        config_file = os.path.join(self.root, "daemon.json")
        with open(config_file, "w") as f:
            f.write("{}\n")
        command = [
            self.dockerd_binary,
            "--host",
            self.host,
            "--data-root",
            os.path.join(self.root, "data"),
            "--exec-root",
            os.path.join(self.root, "x"),
            "--pidfile",
            os.path.join(self.root, "dockerd.pid"),
            "--config-file",
            config_file,
            "--containerd",
            self.containerd_socket,
            "--containerd-namespace",
            self.name,
            "--containerd-plugins-namespace",
            self.name + "-plugins",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--userland-proxy=false",
            "--cgroup-parent",
            "/" + self.name,
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT),
        ]
        if self.live_restore:
            command.append("--live-restore")
        self._dockerd = self._spawn(command, self.dockerd_log_path)
        try:
            self._wait(self._dockerd, self.dockerd_log_path, self._pings, "dockerd")
        except BaseException:
            self._terminate(self._dockerd)
            self._dockerd = None
            raise
        return self

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """
        Stop dockerd (SIGTERM by pid, then wait; SIGKILL after ``timeout``). containerd
        stays. Return dockerd's exit status, or None when it was not running.
        """
        process, self._dockerd = self._dockerd, None
        return self._terminate(process, sig, timeout)

    def restart(self, live_restore=None):
        self.stop()
        return self.start(live_restore)

    def close(self, remove_root=False):
        """
        Remove every container of this daemon, stop dockerd and containerd, and, when
        ``remove_root``, delete the root (only once nothing is mounted under it).
        """
        try:
            if not self.running and self._containerd is not None:
                # Containers that outlived a stop (live-restore) still run under our
                # containerd: a dockerd removes them properly.
                try:
                    self.start()
                except PrivateDockerError:
                    pass
            if self.running:
                for container in self.container_ids(all=True):
                    self.remove_container(container)
        finally:
            self.stop()
            process, self._containerd = self._containerd, None
            self._terminate(process)
            for log in self._logs:
                log.close()
            self._logs = []
        if remove_root:
            # dockerd bind-mounts its data root onto itself (private propagation) and does
            # not always undo it; container mounts are gone with the containers.
            for mount in sorted(_mounts_under(self.root), key=len, reverse=True):
                subprocess.run(["umount", mount], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            left = _mounts_under(self.root)
            if left:
                raise PrivateDockerError(f"still mounted under {self.root}: {left}; not removing it")
            shutil.rmtree(self.root, ignore_errors=True)

    # -- images and containers ---------------------------------------------------------

    def has_image(self, name):
        status, _ = docker_request(self.host, "GET", image_path(name, "/json"), timeout=10.0)
        return status == 200

    def load_image(self, name, source_host=DEFAULT_DOCKER_HOST):
        """
        ``docker save name`` from ``source_host`` into this daemon (``docker load``), once:
        an image this daemon has already is kept.
        """
        if self.has_image(name):
            return
        status, tar = docker_request(source_host, "GET", image_path(name, "/get"), timeout=300.0)
        if status != 200:
            raise PrivateDockerError(f"cannot save {name} from {source_host}: HTTP {status} {tar[:200]!r}")
        status, body = docker_request(
            self.host,
            "POST",
            "/images/load?quiet=1",
            body=tar,
            headers={"Content-Type": "application/x-tar"},
            timeout=300.0,
        )
        if status != 200 or b'"error"' in body:
            raise PrivateDockerError(f"cannot load {name}: HTTP {status} {body[:300]!r}")
        if not self.has_image(name):
            raise PrivateDockerError(f"{name} is not there after the load: {body[:300]!r}")

    def container_ids(self, labels=None, all=True):
        """Ids of this daemon's containers carrying every ``labels`` item (``key=value``, or ``key`` alone)."""
        filters = {"label": [f"{k}={v}" if v is not None else k for k, v in (labels or {}).items()]}
        query = urlencode({"all": "1" if all else "0", "filters": json.dumps(filters)})
        status, body = docker_request(self.host, "GET", "/containers/json?" + query, timeout=30.0)
        if status != 200:
            raise PrivateDockerError(f"cannot list containers: HTTP {status} {body[:200]!r}")
        return [container["Id"] for container in json.loads(body)]

    def remove_container(self, container_id):
        status, body = docker_request(
            self.host, "DELETE", "/containers/" + quote(container_id, safe="") + "?force=1&v=1", timeout=60.0
        )
        return status in (200, 204)

    # -- processes -------------------------------------------------------------------------

    def _start_containerd(self):
        if self._containerd is not None and self._containerd.poll() is None:
            return
        state = os.path.join(self.root, "c")
        config_path = os.path.join(self.root, "containerd.toml")
        with open(config_path, "w") as f:
            f.write(
                "\n".join(
                    [
                        "version = 2",
                        f'root = "{os.path.join(self.root, "containerd")}"',
                        f'state = "{state}"',
                        'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                        "[grpc]",
                        f'  address = "{self.containerd_socket}"',
                        "[ttrpc]",
                        '  address = ""',
                        "[debug]",
                        '  address = ""',
                        "[metrics]",
                        '  address = ""',
                        '[plugins."io.containerd.internal.v1.opt"]',
                        f'  path = "{os.path.join(self.root, "opt")}"',
                        "",
                    ]
                )
            )
        self._containerd = self._spawn([self.containerd_binary, "--config", config_path], self.containerd_log_path)
        try:
            self._wait(
                self._containerd, self.containerd_log_path, lambda: os.path.exists(self.containerd_socket), "containerd"
            )
        except BaseException:
            self._terminate(self._containerd)
            self._containerd = None
            raise

    def _spawn(self, command, log_path):
        log = open(log_path, "ab")
        log.write(("\n=== starting: " + " ".join(command) + "\n").encode())
        log.flush()
        self._logs.append(log)
        # A session of its own: a Ctrl-C meant for pytest must not reach the daemons first.
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _pings(self):
        try:
            status, _ = docker_request(self.host, "GET", "/_ping", timeout=2.0)
        except OSError:
            return False
        return status == 200

    def _wait(self, process, log_path, ready, what):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise PrivateDockerError(f"{what} exited with status {code} while starting:\n{_tail(log_path)}")
            if ready():
                return
            time.sleep(0.05)
        raise PrivateDockerError(f"{what} not ready after {START_TIMEOUT:.0f}s:\n{_tail(log_path)}")

    @staticmethod
    def _terminate(process, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def log_tail(self, lines=30):
        return _tail(self.dockerd_log_path, lines)


def _tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _mounts_under(root):
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if len(line.split()) > 1]
    except OSError:
        return []
    return [point for point in points if point.startswith(root + "/")]


__all__ = ["PrivateDockerError", "PrivateDockerd"]
