"""
The agent's configuration: one frozen value, validated when it is made.

``AgentConfig`` checks every field itself, whatever made it (the command line, a test, a
benchmark): a bad value is a ``ValueError`` whose message starts with the option that sets
it (``--namespace: ...``), so ``tap.Options`` only has to turn it into a usage error. Text
is converted where a field is a number (``AgentConfig(reserved_mem="2g")``). Making one
reads the secret file and resolves the allowed mount roots, and changes nothing: creating
the directories is ``tap.prepare_directories``'s work.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterable
from typing import Any, Callable, TypeVar

import attrs

from bai_agent.protocol.auth import read_secret_file
from bai_agent.values import (
    AGENT_ID_PATTERN,
    NAMESPACE_PATTERN,
    NETWORK_NAME_PATTERN,
    SCRATCH_TYPES,
    parse_cpu,
    parse_heartbeat_interval,
    parse_host_port,
    parse_size,
    parse_warm_pool,
)

__all__ = [
    "AgentConfig",
    "SYSTEM_DIRS",
    "default_advertise_host",
    "default_agent_id",
    "default_docker_host",
    "ensure_private_dir",
]

#: Directories that ``--allowed-mount-root`` may not name: mounting their subtrees into a
#: kernel would hand it the host's system.
SYSTEM_DIRS = frozenset(
    {
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
)

_ID_SYNTAX = "letters, digits, '_', '.', '-'; at most 64"


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
                            return str(address.address)
    except (OSError, StopIteration, ImportError, struct.error):
        pass
    return "127.0.0.1"


def default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


# -- checks of single values; each message follows the option's name -------------------

_T = TypeVar("_T")


def _named(option: str, parse: Callable[[Any], _T], value: object) -> _T:
    """``parse(value)``, its ``ValueError`` (or ``TypeError``) prefixed with ``option``."""
    try:
        return parse(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{option}: {error}") from None


def _option(attribute: attrs.Attribute[Any]) -> str:
    """The command-line option that sets ``attribute``, else the field's own name."""
    return str(attribute.metadata.get("option", attribute.name))


def _matching(pattern: re.Pattern[str], syntax: str) -> Callable[[Any, attrs.Attribute[Any], object], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"{_option(attribute)}: {value!r} is not valid ({syntax})")

    return check


def _text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{_option(attribute)}: expected a non-empty text, got {value!r}")


def _host_port(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _named(_option(attribute), parse_host_port, value)


def _server_endpoint(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    from twisted.internet.endpoints import serverFromString

    if not isinstance(value, str):
        raise ValueError(f"{_option(attribute)}: expected an endpoint description, got {value!r}")
    try:
        # Parsing only: the endpoints Twisted (and its plugins) make just keep the reactor
        # until they listen, so none is needed, and the configuration stays reactor-free.
        serverFromString(None, value)  # type: ignore[no-untyped-call]
    except (TypeError, ValueError, OSError) as error:  # OSError: an ssl: key file
        raise ValueError(f"{_option(attribute)}: {error}") from None


def _docker_host(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.startswith(("unix://", "tcp://")):
        raise ValueError(f"{_option(attribute)}: expected unix:///path or tcp://host:port, got {value!r}")


def _secret_file(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{_option(attribute)}: expected a path, got {value!r}")
    _named(_option(attribute), read_secret_file, value)


def _scratch_type(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in SCRATCH_TYPES:
        raise ValueError(f"{_option(attribute)}: one of {', '.join(SCRATCH_TYPES)}, not {value!r}")


def _flag(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{_option(attribute)}: expected True or False, got {value!r}")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _whole_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(value)


# -- converters: text or numbers to the field's type, each naming its option -----------
# (named functions, one a field, so that mypy's attrs plugin types AgentConfig's __init__)


def _heartbeat_interval(value: float | str) -> float:
    return _named("--heartbeat-interval", parse_heartbeat_interval, value)


def _reserved_cpu(value: float | str) -> float:
    return _named("--reserved-cpu", parse_cpu, value)


def _reserved_mem(value: int | str) -> int:
    return _named("--reserved-mem", parse_size, value)


def _allowed_mount_roots(value: Iterable[str]) -> tuple[str, ...]:
    """Each root as its real path: an existing absolute directory, not the host's system."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"--allowed-mount-root: expected a sequence of paths, got {value!r}")
    roots = []
    for root in value:
        if not isinstance(root, str) or not os.path.isabs(root) or not os.path.isdir(os.path.realpath(root)):
            raise ValueError(f"--allowed-mount-root: {root!r} is not an existing absolute directory")
        real = os.path.realpath(root)
        if real == "/" or real in SYSTEM_DIRS:
            raise ValueError(f"--allowed-mount-root: {root!r} would expose the host's system")
        roots.append(real)
    return tuple(roots)


def _kernel_pids_limit(value: int | str) -> int:
    limit = _named("--kernel-pids-limit", _whole_number, value)
    if not 16 <= limit <= 1 << 22:
        raise ValueError("--kernel-pids-limit: must be between 16 and 4194304")
    return limit


def _max_upload_size(value: int | str) -> int:
    size = _named("--max-upload-size", parse_size, value)
    if size < 1:
        raise ValueError("--max-upload-size: must be at least one byte")
    return size


def _seconds_within(option: str, value: float | str, low: float, high: float) -> float:
    seconds = _named(option, _number, value)
    if not low <= seconds <= high:  # also rejects nan
        raise ValueError(f"{option}: must be between {low:g} and {high:g} seconds")
    return seconds


def _stop_grace_period(value: float | str) -> float:
    return _seconds_within("--stop-grace-period", value, 0, 3600)


def _default_scratch_size(value: int | str) -> int:
    size = _named("--default-scratch-size", parse_size, value)
    if size < 16 << 20:
        raise ValueError("--default-scratch-size: must be at least 16m")
    return size


def _authentication_deadline(value: float | str) -> float:
    deadline = _named("authentication_deadline", _number, value)
    if not deadline > 0:  # also rejects nan
        raise ValueError(f"authentication_deadline: must be more than 0 seconds, got {value!r}")
    return deadline


def _service_port_range(value: tuple[int, int] | str) -> tuple[int, int]:
    if isinstance(value, tuple):
        low, high = value
    else:
        match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", str(value))
        if match is None:
            raise ValueError(f"--service-port-range: {value!r} is not LOW-HIGH, e.g. 30000-31000")
        low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"--service-port-range: {low}-{high} must lie within 1024-65535, low first")
    return (low, high)


def _image_pull_timeout(value: float | str) -> float:
    return _seconds_within("--image-pull-timeout", value, 10, 86400)


def _image_pull_stall_timeout(value: float | str) -> float:
    return _seconds_within("--image-pull-stall-timeout", value, 1, 3600)


def _warm_pool(value: Any) -> dict[str, int]:
    if isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
        return parse_warm_pool(value, "--warm-pool")
    return parse_warm_pool(list(value), "--warm-pool")


def _opt(name: str) -> dict[str, str]:
    return {"option": name}


@attrs.frozen
class AgentConfig:
    """Everything the services need to know, as validated values."""

    etcd_addr: str = attrs.field(default="127.0.0.1:2379", validator=_host_port, metadata=_opt("--etcd-addr"))
    namespace: str = attrs.field(
        default="local", validator=_matching(NAMESPACE_PATTERN, _ID_SYNTAX), metadata=_opt("--namespace")
    )
    agent_id: str = attrs.field(
        factory=default_agent_id, validator=_matching(AGENT_ID_PATTERN, _ID_SYNTAX), metadata=_opt("--agent-id")
    )
    amp_endpoint: str = attrs.field(default="tcp:6001", validator=_server_endpoint, metadata=_opt("--amp-endpoint"))
    advertise_host: str = attrs.field(
        factory=default_advertise_host, validator=_text, metadata=_opt("--advertise-host")
    )
    http_endpoint: str = attrs.field(
        default="tcp:6003:interface=127.0.0.1", validator=_server_endpoint, metadata=_opt("--http-endpoint")
    )
    scratch_root: str = attrs.field(default="/var/cache/scratches", validator=_text, metadata=_opt("--scratch-root"))
    state_dir: str = attrs.field(default="/var/lib/bai-agent", validator=_text, metadata=_opt("--state-dir"))
    docker_host: str = attrs.field(factory=default_docker_host, validator=_docker_host, metadata=_opt("--docker-host"))
    heartbeat_interval: float = attrs.field(default=3.0, converter=_heartbeat_interval)
    secret_file: str | None = attrs.field(default=None, validator=_secret_file, metadata=_opt("--secret-file"))
    reserved_cpu: float = attrs.field(default=0.0, converter=_reserved_cpu)
    reserved_mem: int = attrs.field(default=0, converter=_reserved_mem)
    allowed_mount_roots: tuple[str, ...] = attrs.field(default=(), converter=_allowed_mount_roots)
    # The warm pool (section 9): containers kept ready per image; etcd's warm_pool replaces it.
    warm_pool: dict[str, int] = attrs.field(factory=dict, converter=_warm_pool)
    kernel_network: str = attrs.field(
        default="bridge",
        validator=_matching(NETWORK_NAME_PATTERN, "a Docker network name"),
        metadata=_opt("--kernel-network"),
    )
    kernel_pids_limit: int = attrs.field(default=1024, converter=_kernel_pids_limit)
    max_upload_size: int = attrs.field(default=100 << 20, converter=_max_upload_size)
    stop_grace_period: float = attrs.field(default=10.0, converter=_stop_grace_period)
    default_scratch_size: int = attrs.field(default=10 << 30, converter=_default_scratch_size)
    # auto, quota, hostfile or dir (bai_agent.node.scratch)
    scratch_type: str = attrs.field(default="auto", validator=_scratch_type, metadata=_opt("--scratch-type"))
    destroy_kernels_on_stop: bool = attrs.field(
        default=False, validator=_flag, metadata=_opt("--destroy-kernels-on-stop")
    )
    service_port_range: tuple[int, int] = attrs.field(default=(30000, 31000), converter=_service_port_range)
    # Where the relays of kernels' services listen; None: the advertise host.
    service_host: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_text), metadata=_opt("--service-host")
    )
    # Pulls of images from registries (bai_agent.images.pulls): the longest one may take,
    # and the longest it may go without progress.
    image_pull_timeout: float = attrs.field(default=1800.0, converter=_image_pull_timeout)
    image_pull_stall_timeout: float = attrs.field(default=120.0, converter=_image_pull_stall_timeout)
    # Seconds a manager connection has to authenticate (bai_agent.rpc.limits.AUTHENTICATION_DEADLINE).
    authentication_deadline: float = attrs.field(default=5.0, converter=_authentication_deadline)

    @property
    def relay_host(self) -> str:
        """Where service relays listen and what StartService answers name."""
        return self.service_host or self.advertise_host

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
