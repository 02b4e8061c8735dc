"""
The syntax of the agent's values: ids, sizes, addresses, durations.

Standard library only, so that anything (the agent's configuration, the etcd tunables, a
manager's request, a command-line tool) can check a value the same way. Every parser
raises ``ValueError`` with a message that reads well after the name of what was given
(``--reserved-mem: not a size ...``).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = [
    "AGENT_ID_PATTERN",
    "HEARTBEAT_INTERVAL_RANGE",
    "KERNEL_ID_PATTERN",
    "MAX_TIMEOUT",
    "NAMESPACE_PATTERN",
    "NETWORK_NAME_PATTERN",
    "SCRATCH_TYPES",
    "parse_cpu",
    "parse_heartbeat_interval",
    "parse_host_port",
    "parse_size",
    "parse_timeout",
]

#: A kernel id, as managers must choose it: a letter or digit, then letters, digits,
#: ``_``, ``.`` or ``-``; at most 64 in all. It names files and containers, so no ``/``.
KERNEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: A cluster namespace (it names etcd keys ``/bai/NAMESPACE/``): the same syntax as ids.
NAMESPACE_PATTERN = KERNEL_ID_PATTERN
#: An agent id (it names the agent's etcd record): the same syntax as kernel ids.
AGENT_ID_PATTERN = KERNEL_ID_PATTERN
#: A Docker network name: like an id, ``:`` also allowed (``container:NAME``), at most 128.
NETWORK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")

#: How kernel homes may be limited (``--scratch-type``, ``bai_agent.node.scratch``): project
#: quotas, a loop-mounted image per kernel, not at all, or quotas where supported else images.
SCRATCH_TYPES = ("auto", "quota", "hostfile", "dir")

#: The longest idle or exec timeout, in seconds, whether from a manager or from etcd.
MAX_TIMEOUT = 365 * 24 * 3600
#: The heartbeat intervals allowed, in seconds, on the command line and in etcd.
HEARTBEAT_INTERVAL_RANGE = (0.5, 300.0)

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: object) -> int:
    """
    Bytes, from a non-negative int, a float with no fraction, or text: a number with an
    optional binary unit ``k``, ``m``, ``g``, ``t`` or ``p`` (any case, ``i`` and ``b``
    allowed after it): ``1024``, ``512m``, ``2g``, ``1.5G``, ``512MiB``. Below 2**63.
    """
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


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """
    ``(host, port)`` from ``HOST:PORT``, or ``[V6ADDRESS]:PORT`` for IPv6; the port is 1 to
    65535. A bare ``HOST`` is accepted only when ``default_port`` is given.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        host, port = value.strip(), str(default_port) if default_port else ""
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def parse_timeout(value: int | str) -> int:
    """
    Whole seconds from 0 (never) to ``MAX_TIMEOUT``, from an int or its decimal text
    (``"600"``); a bool, a float or any other type is refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected whole seconds, got {value!r}")
    seconds = int(value)
    if not 0 <= seconds <= MAX_TIMEOUT:
        raise ValueError(f"must be whole seconds between 0 and {MAX_TIMEOUT}, got {value!r}")
    return seconds


def parse_heartbeat_interval(value: float | str) -> float:
    """
    Seconds between heartbeats, from a number or its text (``"3"``, ``"0.5"``), within
    ``HEARTBEAT_INTERVAL_RANGE`` (0.5 to 300); ``nan`` is refused.
    """
    interval = _float(value, "seconds")
    low, high = HEARTBEAT_INTERVAL_RANGE
    if not low <= interval <= high:  # also rejects nan
        raise ValueError(f"must be between {low} and {high} seconds, got {value!r}")
    return interval


def parse_cpu(value: float | str) -> float:
    """
    A number of CPU cores, from a number or its text (``"1.5"``): finite and not negative;
    fractions are allowed.
    """
    number = _float(value, "a non-negative number of cores")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a non-negative number of cores, got {value!r}")
    return number


def _float(value: object, what: str) -> float:
    """``float(value)`` for numbers and text only; ``ValueError`` (never ``TypeError``) else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {what}, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None


MAX_POOL_SIZE = 64  # warm pool containers per image


def parse_warm_pool(value: Any, where: str = "warm_pool") -> dict[str, int]:
    """
    ``{"IMAGE": N}`` (etcd's Json), or a list of ``IMAGE=N`` (the command line's), as
    ``{image: n}`` with 0 <= n <= MAX_POOL_SIZE; ``ValueError`` naming ``where`` otherwise.
    """
    if isinstance(value, (list, tuple)):
        pairs = []
        for item in value:
            image, equals, count = str(item).rpartition("=")
            if not equals or not image:
                raise ValueError(f"{where}: {str(item)[:100]!r} is not IMAGE=N")
            pairs.append((image, count))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"{where}: must be an object of image: count")
    targets: dict[str, int] = {}
    for image, count in pairs:
        if not isinstance(image, str) or not image or len(image) > 512 or not image.isprintable():
            raise ValueError(f"{where}: an image must be a name")
        try:
            n = int(count) if not isinstance(count, bool) else -1
        except (TypeError, ValueError):
            n = -1
        if isinstance(count, float) and not count.is_integer():
            n = -1
        if not 0 <= n <= MAX_POOL_SIZE:
            raise ValueError(f"{where}: the count of {image[:100]} must be an integer from 0 to {MAX_POOL_SIZE}")
        targets[image] = n
    return targets
