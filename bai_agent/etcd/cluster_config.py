"""
The cluster-wide agent config (PROTOCOL.md section 4): the tunables an operator sets under
``/bai/{ns}/config/agent/``, read at registration and watched after, each checked like the
command line's value before the agent uses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from bai_agent.etcd.interface import IEtcd, IWatch
from bai_agent.protocol.keys import (
    EXEC_TIMEOUT,
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    SECRET_NAME,
    WARM_POOL,
    name_under,
)
from bai_agent.values import parse_heartbeat_interval, parse_timeout, parse_warm_pool


def _warm_pool(text: str) -> dict[str, int]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError('warm_pool: must be Json {"IMAGE": N}') from None
    return parse_warm_pool(value, "warm_pool")


# The same checks as the command line's and a manager's: a value in etcd is no more trusted.
CONFIG_PARSERS: dict[str, Callable[[str], Any]] = {
    HEARTBEAT_INTERVAL: parse_heartbeat_interval,
    IDLE_TIMEOUT: parse_timeout,
    EXEC_TIMEOUT: parse_timeout,
    WARM_POOL: _warm_pool,
}

ConfigListener = Callable[[str, Any], object]

_MISSING = object()


def parse_config_value(name: str, raw: bytes) -> Any:
    """A validated tunable (``ValueError`` if invalid); unknown names stay raw strings."""
    text = raw.decode("utf-8")
    parser = CONFIG_PARSERS.get(name)
    if parser is None:
        return text
    return parser(text.strip())


class ClusterConfig:
    """
    ``values``: the valid tunables now set, by name (the secret is not one of them: its
    changes go to ``on_secret``). ``on_heartbeat_interval(seconds or None)`` hears of the
    interval first, then the listeners hear of every change.
    """

    log = Logger()

    def __init__(
        self,
        etcd: IEtcd,
        prefix: bytes,
        on_heartbeat_interval: Callable[[float | None], object],
    ) -> None:
        self._etcd = etcd
        self.prefix = prefix
        self._on_heartbeat_interval = on_heartbeat_interval
        self.values: dict[str, Any] = {}
        self._listeners: list[ConfigListener] = []

    def add_listener(self, callback: ConfigListener) -> None:
        """Call ``callback(name, value)`` for every later config change (None: removed)."""
        self._listeners.append(callback)

    def watch(self, on_secret: Callable[[bytes | None], object], wanted: Callable[[], bool]) -> IWatch:
        """
        Watch the prefix: the secret's changes go to ``on_secret``, the others are applied,
        as long as ``wanted()``. Returns the ``IWatch``.
        """

        def changed(key: bytes, value: bytes | None) -> None:
            if not wanted():
                return
            name = name_under(self.prefix, key)
            if name == SECRET_NAME:
                on_secret(value)
            elif value is None:
                self.remove(name)
            else:
                self.apply(name, value)

        watch: IWatch = self._etcd.watch_prefix(self.prefix, changed)
        return watch

    def apply_snapshot(self, values: Mapping[bytes, bytes]) -> None:
        """Make ``values`` (every key under the prefix, as read) the config."""
        seen = set()
        for key, raw in sorted(values.items()):
            name = name_under(self.prefix, key)
            if name == SECRET_NAME:
                continue
            seen.add(name)
            self.apply(name, raw)
        for name in list(self.values):
            if name not in seen:
                self.remove(name)

    def apply(self, name: str, raw: bytes) -> None:
        try:
            value = parse_config_value(name, raw)
        except ValueError as error:
            self.log.error(
                "ignoring invalid cluster config {key} = {raw!r}: {error}",
                key=(self.prefix + name.encode("utf-8")).decode("utf-8"),
                raw=raw,
                error=error,
            )
            return
        if self.values.get(name, _MISSING) == value:
            return
        self.values[name] = value
        self.log.info("cluster config {name} = {value!r}", name=name, value=value)
        if name == HEARTBEAT_INTERVAL:
            self._on_heartbeat_interval(value)
        self._notify(name, value)

    def remove(self, name: str) -> None:
        if self.values.pop(name, _MISSING) is _MISSING:
            return
        self.log.info("cluster config {name} removed", name=name)
        if name == HEARTBEAT_INTERVAL:
            self._on_heartbeat_interval(None)
        self._notify(name, None)

    def _notify(self, name: str, value: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(name, value)
            except Exception:
                self.log.failure("config listener {listener!r} failed on {name}", listener=listener, name=name)
