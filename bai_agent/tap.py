"""
``twistd bai-agent`` / ``twist bai-agent``: options and ``makeService``.

This is the only module that imports the global reactor.
"""

import os
import re

from twisted.python import usage

from bai_agent.config import (
    AGENT_ID_PATTERN,
    NAMESPACE_PATTERN,
    AgentConfig,
    default_advertise_host,
    default_agent_id,
    default_docker_host,
    ensure_private_dir,
    parse_cpu,
    parse_heartbeat_interval,
    parse_host_port,
    parse_size,
)
from bai_agent.kernels.workspace import check_socket_room
from bai_agent.node.scratch import KINDS as SCRATCH_KINDS

NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
SYSTEM_DIRS = {
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/root",
    "/var",
    "/run",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a bai-agent: register this machine in etcd under a namespace and serve "
        "managers over AMP. See README.md and PROTOCOL.md."
    )

    optParameters = [
        ["etcd-addr", None, "127.0.0.1:2379", "etcd client address, HOST:PORT."],
        ["namespace", None, "local", "Cluster namespace: keys live under /bai/NAMESPACE/."],
        ["agent-id", None, None, "This agent's id (default: derived from the host name, stable across restarts)."],
        ["amp-endpoint", None, "tcp:6001", "Twisted server endpoint managers connect to."],
        ["advertise-host", None, None, "Host managers dial (default: the address of the default route)."],
        ["http-endpoint", None, "tcp:6003:interface=127.0.0.1", "Twisted server endpoint of the status page."],
        ["scratch-root", None, "/var/cache/scratches", "Directory of kernel home dirs (created 0700)."],
        ["state-dir", None, "/var/lib/bai-agent", "Directory of the agent's own state (created 0700)."],
        ["docker-host", None, None, "Docker Engine address (default: $DOCKER_HOST, else unix:///var/run/docker.sock)."],
        ["heartbeat-interval", None, "3", "Seconds between etcd record refreshes (0.5 to 300)."],
        ["secret-file", None, None, "File holding the namespace secret (hex); overrides etcd's."],
        ["reserved-cpu", None, "0", "CPU cores kept back for the host."],
        ["reserved-mem", None, "0", "Memory kept back for the host: bytes, or 512m, 2g."],
        ["kernel-network", None, "bridge", "Docker network of kernels ('none' for no network)."],
        ["kernel-pids-limit", None, "1024", "Most processes one kernel may run."],
        ["max-upload-size", None, "100m", "Largest file UploadFile may make in a kernel's home."],
        [
            "stop-grace-period",
            None,
            "10",
            "Seconds a graceful stop (SIGTERM) waits for commands in flight (0 to 3600).",
        ],
        [
            "default-scratch-size",
            None,
            "10g",
            "Most a kernel's home may hold when CreateKernel names no scratch (at least 16m).",
        ],
        [
            "scratch-type",
            None,
            "auto",
            "How homes are limited: quota (project quotas of the scratch root), hostfile "
            "(a loop-mounted image per kernel), dir (not limited), or auto (quota where supported, else hostfile).",
        ],
    ]

    optFlags = [
        [
            "destroy-kernels-on-stop",
            None,
            "Destroy all kernels on a graceful stop (default: they keep running and the next start takes them over).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["allowed-mount-root"] = []

    def opt_allowed_mount_root(self, path):
        """A host directory whose subtrees managers may mount into kernels (repeatable)."""
        self["allowed-mount-root"].append(path)

    def _parse(self, option, parser, *args):
        try:
            return parser(self[option], *args)
        except (TypeError, ValueError) as e:
            raise usage.UsageError(f"--{option}: {e}") from None

    def postOptions(self):
        from twisted.internet import reactor

        self._parse("etcd-addr", parse_host_port)
        for option, pattern in (("namespace", NAMESPACE_PATTERN), ("agent-id", AGENT_ID_PATTERN)):
            if self[option] is not None and not pattern.match(self[option]):
                raise usage.UsageError(
                    f"--{option}: {self[option]!r} is not valid (letters, digits, '_', '.', '-'; at most 64)"
                )
        for option in ("amp-endpoint", "http-endpoint"):
            self._parse(option, _check_server_endpoint, reactor)
        docker_host = self["docker-host"] or default_docker_host()
        if not docker_host.startswith(("unix://", "tcp://")):
            raise usage.UsageError(f"--docker-host: expected unix:///path or tcp://host:port, got {docker_host!r}")
        heartbeat = self._parse("heartbeat-interval", parse_heartbeat_interval)
        if self["secret-file"] is not None:
            try:
                with open(self["secret-file"]) as secret_file:
                    secret = secret_file.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--secret-file: cannot read {self['secret-file']}: {e.strerror}") from None
            if len(secret) < 64 or any(c not in "0123456789abcdefABCDEF" for c in secret):
                raise usage.UsageError("--secret-file: the secret must be at least 64 hex digits")
        for option, what in (("scratch-root", "scratch root"), ("state-dir", "state dir")):
            self._parse(option, ensure_private_dir, what)
        self._parse("state-dir", check_socket_room)
        roots = []
        for root in self["allowed-mount-root"]:
            real = os.path.realpath(root)
            if not os.path.isabs(root) or not os.path.isdir(real):
                raise usage.UsageError(f"--allowed-mount-root: {root!r} is not an existing absolute directory")
            if real == "/" or real in SYSTEM_DIRS:
                raise usage.UsageError(f"--allowed-mount-root: {root!r} would expose the host's system")
            roots.append(real)
        if not NETWORK_NAME.match(self["kernel-network"]):
            raise usage.UsageError(f"--kernel-network: {self['kernel-network']!r} is not a network name")
        max_upload_size = self._parse("max-upload-size", parse_size)
        if max_upload_size < 1:
            raise usage.UsageError("--max-upload-size: must be at least one byte")
        pids_limit = self._parse("kernel-pids-limit", int)
        if not 16 <= pids_limit <= 1 << 22:
            raise usage.UsageError("--kernel-pids-limit: must be between 16 and 4194304")
        default_scratch_size = self._parse("default-scratch-size", parse_size)
        if default_scratch_size < 16 << 20:
            raise usage.UsageError("--default-scratch-size: must be at least 16m")
        if self["scratch-type"] not in SCRATCH_KINDS:
            raise usage.UsageError(f"--scratch-type: one of {', '.join(SCRATCH_KINDS)}, not {self['scratch-type']!r}")
        grace = self._parse("stop-grace-period", float)
        if not 0 <= grace <= 3600:
            raise usage.UsageError("--stop-grace-period: must be between 0 and 3600 seconds")
        self.config = AgentConfig(
            etcd_addr=self["etcd-addr"],
            namespace=self["namespace"],
            agent_id=self["agent-id"] or default_agent_id(),
            amp_endpoint=self["amp-endpoint"],
            advertise_host=self["advertise-host"] or default_advertise_host(),
            http_endpoint=self["http-endpoint"],
            scratch_root=self["scratch-root"],
            state_dir=self["state-dir"],
            docker_host=docker_host,
            heartbeat_interval=heartbeat,
            secret_file=self["secret-file"],
            reserved_cpu=self._parse("reserved-cpu", parse_cpu),
            reserved_mem=self._parse("reserved-mem", parse_size),
            allowed_mount_roots=tuple(roots),
            kernel_network=self["kernel-network"],
            kernel_pids_limit=pids_limit,
            max_upload_size=max_upload_size,
            stop_grace_period=grace,
            destroy_kernels_on_stop=bool(self["destroy-kernels-on-stop"]),
            default_scratch_size=default_scratch_size,
            scratch_type=self["scratch-type"],
        )


def _check_server_endpoint(description, reactor):
    from twisted.internet.endpoints import serverFromString

    serverFromString(reactor, description)


def makeService(options):
    from twisted.internet import reactor

    from bai_agent.runtime.rlimits import raise_open_file_limit
    from bai_agent.service import build_agent_service

    raise_open_file_limit()
    try:
        service = build_agent_service(reactor, options.config)
    except ValueError as e:
        raise SystemExit(f"bai-agent: {e}")
    reactor.callWhenRunning(_stop_gracefully_on_sigterm, reactor)
    return service


def _stop_gracefully_on_sigterm(reactor):
    """
    SIGTERM is how supervisors ask for a graceful stop, and a graceful stop exits 0.
    Twisted's own handler records the signal and ``twist`` re-raises it after shutdown,
    so the process would die "by SIGTERM"; this handler stops the reactor the same way
    (services stop in reverse order, the lease is revoked) without that.
    """
    import signal

    signal.signal(signal.SIGTERM, sigterm_handler(reactor))
    # Once the reactor has stopped the process is exiting anyway; Python would put back the
    # default action while it finalizes, and a late SIGTERM would then kill it "by signal".
    reactor.addSystemEventTrigger("after", "shutdown", signal.signal, signal.SIGTERM, signal.SIG_IGN)


def sigterm_handler(reactor):
    """The first SIGTERM starts the graceful stop; later ones only say it is under way."""
    from twisted.logger import Logger

    log = Logger()
    received = []

    def handler(signum, frame):
        if received:
            reactor.callFromThread(log.info, "SIGTERM again: the graceful stop is already under way")
            return
        received.append(signum)
        reactor.callFromThread(reactor.stop)

    return handler
