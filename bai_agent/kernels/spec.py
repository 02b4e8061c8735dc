"""
Validation of what a manager asks for in ``CreateKernel`` (PROTOCOL.md section 2): the
kernel id, environment, mounts and timeouts. Everything here raises ``InvalidRequest``
with a message naming the argument; nothing touches the disk but ``resolve_mounts``'s
``realpath``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import attrs

from bai_agent.kernels import pinned_mounts
from bai_agent.protocol.errors import InvalidRequest
from bai_agent.values import KERNEL_ID_PATTERN, MAX_TIMEOUT

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # matched whole (fullmatch): no trailing newline
# Names that the dynamic loader, the C library or an interpreter read at start-up to run or
# load other code (glibc's "unsecure" variables, which it drops for setuid programs, and
# Python's start-up hooks). The runner never runs with the kernel's environment, but a
# root process in the container that inherited one of these by mistake would run user
# code as root: they are refused outright (PROTOCOL.md section 6).
LOADER_PREFIXES = ("LD_",)
LOADER_NAMES = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
        "GLIBC_TUNABLES",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PYTHONHOME",
        "PYTHONEXECUTABLE",
        "PYTHONBREAKPOINT",
        "PERL5OPT",
        "PERL5LIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "BASH_ENV",
    }
)
MAX_ENV_ENTRIES = 1000
MAX_ENV_VALUE = 32 * 1024
MAX_MOUNTS = 64
# Targets a mount must never cover, nor lie under: the kernel's own plumbing (its home,
# the runner at /opt/bai, its socket at /run/bai, /tmp) and the system.
RESERVED_TARGETS = (
    "/",
    "/home",
    "/run",
    "/opt",
    "/tmp",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/var",
    "/boot",
    "/root",
)


def check_kernel_id(kernel_id: Any) -> str:
    if not isinstance(kernel_id, str) or not KERNEL_ID_PATTERN.match(kernel_id):
        raise InvalidRequest(f"kernel_id must match {KERNEL_ID_PATTERN.pattern}, got {str(kernel_id)[:80]!r}")
    return kernel_id


def check_kernel_id_quietly(kernel_id: Any) -> bool:
    return isinstance(kernel_id, str) and bool(KERNEL_ID_PATTERN.match(kernel_id))


def check_environ(environ: Any) -> dict[str, str]:
    """``environ`` must be a JSON object of string names to string values."""
    if environ is None:
        return {}
    if not isinstance(environ, dict):
        raise InvalidRequest(f"environ must be an object of strings, got {type(environ).__name__}")
    if len(environ) > MAX_ENV_ENTRIES:
        raise InvalidRequest(f"environ has more than {MAX_ENV_ENTRIES} entries")
    for name, value in environ.items():
        if not ENV_NAME.fullmatch(name):
            raise InvalidRequest(f"environ name {name[:80]!r} is not a valid variable name (letters, digits, '_')")
        if name.startswith(LOADER_PREFIXES) or name in LOADER_NAMES:
            raise InvalidRequest(
                f"environ name {name} is refused: the dynamic loader or an interpreter's start-up reads it"
            )
        if not isinstance(value, str):
            raise InvalidRequest(f"environ value of {name} must be a string, got {type(value).__name__}")
        if "\0" in value or "\n" in value or len(value) > MAX_ENV_VALUE:
            raise InvalidRequest(
                f"environ value of {name} contains NUL or a newline, or is longer than {MAX_ENV_VALUE}"
            )
    return dict(environ)


def check_timeout(name: str, value: Any, default: Any) -> int:
    """A timeout in whole seconds, 0 meaning never; None takes ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > MAX_TIMEOUT:
        raise InvalidRequest(f"{name} must be whole seconds between 0 and {MAX_TIMEOUT}, got {value!r}")
    return value


@attrs.frozen
class Mount:
    source: str  # a real path on the host, under an allowed root
    target: str  # an absolute path in the container
    read_only: bool

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "mode": "ro" if self.read_only else "rw"}


def resolve_mounts(mounts: Any, allowed_roots: Iterable[str]) -> tuple[Mount, ...]:
    """
    Check the manager's ``mounts`` against the operator's allowed roots. A source is
    resolved (symlinks followed) before the check, so ``..`` and links cannot escape a
    root; ``/`` and system directories are never mountable, as sources or targets. What
    Docker mounts is checked again, and pinned, at every container start
    (``pinned_mounts``).
    """
    if mounts is None:
        return ()
    if not isinstance(mounts, list):
        raise InvalidRequest(f"mounts must be a list, got {type(mounts).__name__}")
    if len(mounts) > MAX_MOUNTS:
        raise InvalidRequest(f"at most {MAX_MOUNTS} mounts")
    roots = [os.path.realpath(root) for root in allowed_roots]
    resolved = []
    targets = set()
    for index, mount in enumerate(mounts):
        where = f"mounts[{index}]"
        if not isinstance(mount, dict) or set(mount) - {"source", "target", "mode"}:
            raise InvalidRequest(f"{where} must be an object with source, target and mode")
        source, target, mode = mount.get("source"), mount.get("target"), mount.get("mode", "ro")
        if not isinstance(source, str) or not source.startswith("/") or "\0" in source:
            raise InvalidRequest(f"{where}.source must be an absolute path")
        if not isinstance(target, str) or not target.startswith("/") or "\0" in target or ":" in target:
            raise InvalidRequest(f"{where}.target must be an absolute path without ':'")
        if mode not in ("ro", "rw"):
            raise InvalidRequest(f"{where}.mode must be 'ro' or 'rw', got {mode!r}")
        target = os.path.normpath(target)
        if target.startswith("//"):
            target = target[1:]
        if any(
            target == reserved or (reserved != "/" and target.startswith(reserved + "/"))
            for reserved in RESERVED_TARGETS
        ):
            raise InvalidRequest(f"{where}.target {target} is reserved")
        if target in targets:
            raise InvalidRequest(f"{where}.target {target} is mounted twice")
        real = os.path.realpath(source)
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots if root != "/"):
            raise InvalidRequest(f"{where}.source {source} is not under an allowed mount root")
        # What was resolved must open without following a symlink: a link swapped in
        # after the realpath is refused here, and again before every container start.
        try:
            os.close(pinned_mounts.open_source(real, roots))
        except InvalidRequest as e:
            raise InvalidRequest(f"{where}.source {source}: {e}") from None
        targets.add(target)
        resolved.append(Mount(source=real, target=target, read_only=(mode == "ro")))
    return tuple(resolved)
