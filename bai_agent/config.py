"""
The agent's configuration: one frozen value, validated when it is made.

Every parser raises ``ValueError`` with a message fit for a usage error; ``tap.Options``
turns it into one that names the option.
"""

import math
import os
import re
import socket
import struct

import attrs

KERNEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
AGENT_ID_PATTERN = KERNEL_ID_PATTERN

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value) -> int:
    """Bytes from an int or a string like ``512m``, ``2g``, ``1.5G``, ``512MiB``, ``1024``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"not a size: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    match = _SIZE_PATTERN.match(value)
    if match is None:
        raise ValueError(f"not a size (use bytes or a number with k, m, g, t, p): {value!r}")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit.lower()]
    if not math.isfinite(size) or size >= 1 << 63:
        raise ValueError(f"size too large: {value!r}")
    return int(size)


def parse_host_port(value: str, default_port=None):
    """``(host, port)`` from ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        host, port = value.strip(), str(default_port) if default_port else ""
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


#: The longest idle or exec timeout, in seconds, whether from a manager or from etcd.
MAX_TIMEOUT = 365 * 24 * 3600
#: The heartbeat intervals allowed, in seconds, on the command line and in etcd.
HEARTBEAT_INTERVAL_RANGE = (0.5, 300.0)


def parse_timeout(value) -> int:
    """Whole seconds between 0 (never) and ``MAX_TIMEOUT``, from an int or its text."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected whole seconds, got {value!r}")
    seconds = int(value)
    if not 0 <= seconds <= MAX_TIMEOUT:
        raise ValueError(f"must be whole seconds between 0 and {MAX_TIMEOUT}, got {value!r}")
    return seconds


def parse_heartbeat_interval(value) -> float:
    """Seconds between heartbeats, within ``HEARTBEAT_INTERVAL_RANGE``."""
    interval = float(value)
    low, high = HEARTBEAT_INTERVAL_RANGE
    if not low <= interval <= high:  # also rejects nan
        raise ValueError(f"must be between {low} and {high} seconds, got {value!r}")
    return interval


def parse_cpu(value) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a non-negative number of cores, got {value!r}")
    return number


def default_agent_id() -> str:
    """The host name, made into a valid id: stable across restarts of the same machine."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-._") or "agent"
    if not name[0].isalnum():
        name = "a" + name
    return name[:64]


def default_advertise_host() -> str:
    """
    The IPv4 address of the interface that carries the default route, read from
    ``/proc/net/route`` (nothing is sent anywhere); loopback when there is none.
    """
    try:
        import psutil

        with open("/proc/net/route") as routes:
            next(routes)
            for line in routes:
                fields = line.split()
                if len(fields) > 1 and fields[1] == "00000000":
                    for address in psutil.net_if_addrs().get(fields[0], []):
                        if address.family == socket.AF_INET:
                            return address.address
    except (OSError, StopIteration, ImportError, struct.error):
        pass
    return "127.0.0.1"


def default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _check_pattern(pattern, what):
    def check(instance, attribute, value):
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"invalid {what}: {value!r} (letters, digits, '_', '.', '-'; at most 64)")

    return check


@attrs.frozen
class AgentConfig:
    """Everything the services need to know, as validated values."""

    etcd_addr: str = "127.0.0.1:2379"
    namespace: str = attrs.field(default="local", validator=_check_pattern(NAMESPACE_PATTERN, "namespace"))
    agent_id: str = attrs.field(factory=default_agent_id, validator=_check_pattern(AGENT_ID_PATTERN, "agent id"))
    amp_endpoint: str = "tcp:6001"
    advertise_host: str = attrs.field(factory=default_advertise_host)
    http_endpoint: str = "tcp:6003:interface=127.0.0.1"
    scratch_root: str = "/var/cache/scratches"
    state_dir: str = "/var/lib/bai-agent"
    docker_host: str = attrs.field(factory=default_docker_host)
    heartbeat_interval: float = 3.0
    secret_file: str = None
    reserved_cpu: float = 0.0
    reserved_mem: int = 0
    allowed_mount_roots: tuple = ()
    kernel_network: str = "bridge"
    kernel_pids_limit: int = 1024
    max_upload_size: int = 100 << 20
    stop_grace_period: float = 10.0
    default_scratch_size: int = 10 << 30
    scratch_type: str = "auto"  # auto, quota, hostfile or dir (bai_agent.node.scratch)
    destroy_kernels_on_stop: bool = False
    # Seconds a manager connection has to authenticate (bai_agent.rpc.limits.AUTHENTICATION_DEADLINE).
    authentication_deadline: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))

    @property
    def etcd_url(self) -> str:
        host, port = parse_host_port(self.etcd_addr)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def secret_cache_path(self) -> str:
        return os.path.join(self.state_dir, "secret")


def ensure_private_dir(path: str, what: str) -> None:
    """Create ``path`` with mode 0700 if absent; raise ``ValueError`` if it is not writable."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {what} {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable by this user")
