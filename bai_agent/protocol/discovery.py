"""
Finding agents through etcd (PROTOCOL.md section 4), for managers and ``bai-agent-ctl``.

These helpers take any ``IEtcd`` provider (``bai_agent.etcd.txetcd.TxEtcd`` for a real
server), so this module stays importable without the rest of the agent. The keys come from
``bai_agent.protocol.keys``.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.protocol.keys import agents_prefix, namespace_prefix, secret_key

__all__ = ["EtcdReader", "agents_prefix", "list_agents", "namespace_prefix", "read_secret", "secret_key"]


class EtcdReader(Protocol):
    """The part of ``IEtcd`` these helpers use."""

    def get(self, key: bytes) -> Deferred[bytes | None]: ...

    def get_prefix(self, prefix: bytes) -> Deferred[dict[bytes, bytes]]: ...


@inlineCallbacks
def list_agents(etcd: EtcdReader, namespace: str) -> Generator[Deferred[Any], Any, list[dict[str, Any]]]:
    """Fire with the agent records of ``namespace``, sorted by agent id; bad ones skipped."""
    found: dict[bytes, bytes] = yield etcd.get_prefix(agents_prefix(namespace))
    records: list[dict[str, Any]] = []
    for _key, value in found.items():
        try:
            record = json.loads(value.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("agent_id"), str):
            records.append(record)
    return sorted(records, key=lambda record: str(record["agent_id"]))


@inlineCallbacks
def read_secret(etcd: EtcdReader, namespace: str) -> Generator[Deferred[Any], Any, str | None]:
    """Fire with the namespace's secret (str), or None when none is set."""
    value: bytes | None = yield etcd.get(secret_key(namespace))
    return None if value is None else value.decode("utf-8").strip()
