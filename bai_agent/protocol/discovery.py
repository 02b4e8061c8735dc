"""
Finding agents through etcd (PROTOCOL.md section 4), for managers and ``bai-agent-ctl``.

These helpers take any ``IEtcd`` provider (``bai_agent.etcd.txetcd.TxEtcd`` for a real
server), so this module stays importable without the rest of the agent.
"""

import json

from twisted.internet.defer import inlineCallbacks


def namespace_prefix(namespace: str) -> bytes:
    return f"/bai/{namespace}/".encode()


def agents_prefix(namespace: str) -> bytes:
    return namespace_prefix(namespace) + b"agents/"


def secret_key(namespace: str) -> bytes:
    return namespace_prefix(namespace) + b"config/agent/secret"


@inlineCallbacks
def list_agents(etcd, namespace: str):
    """Fire with the agent records of ``namespace``, sorted by agent id; bad ones skipped."""
    found = yield etcd.get_prefix(agents_prefix(namespace))
    records = []
    for _key, value in found.items():
        try:
            record = json.loads(value.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("agent_id"), str):
            records.append(record)
    return sorted(records, key=lambda record: record["agent_id"])


@inlineCallbacks
def read_secret(etcd, namespace: str):
    """Fire with the namespace's secret (str), or None when none is set."""
    value = yield etcd.get(secret_key(namespace))
    return None if value is None else value.decode("utf-8").strip()
