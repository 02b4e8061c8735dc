"""
The etcd key layout (PROTOCOL.md section 4): every key the agent and managers read or write.

Keys are bytes, as ``IEtcd`` takes them; the namespace and agent id are put in as UTF-8.
Stdlib only, so that a manager can import it without the agent.

    /bai/{ns}/                                   namespace_prefix
    /bai/{ns}/agents/                            agents_prefix
    /bai/{ns}/agents/{agent_id}                  agent_key: the agent record, under a lease
    /bai/{ns}/config/agent/                      agent_config_prefix: cluster-wide tunables
    /bai/{ns}/config/agent/secret                secret_key: the namespace secret
    /bai/{ns}/config/agent/{name}                agent_config_key
    /bai/{ns}/config/registries/                 registries_prefix
    /bai/{ns}/config/registries/{host[:port]}    registry_key: a registry's credentials
"""

from __future__ import annotations

ROOT = "/bai/"

# The name of the secret among the agent config keys (``config/agent/secret``).
SECRET_NAME = "secret"

# The tunables under ``config/agent/`` that the agent reads and watches.
HEARTBEAT_INTERVAL = "heartbeat_interval"
IDLE_TIMEOUT = "idle_timeout"
EXEC_TIMEOUT = "exec_timeout"
WARM_POOL = "warm_pool"


def _encode(text: str) -> bytes:
    return text.encode("utf-8")


def namespace_prefix(namespace: str) -> bytes:
    """``/bai/{namespace}/``: every key of the namespace starts with it."""
    return _encode(f"{ROOT}{namespace}/")


def agents_prefix(namespace: str) -> bytes:
    """``/bai/{namespace}/agents/``: the agent records."""
    return namespace_prefix(namespace) + b"agents/"


def agent_key(namespace: str, agent_id: str) -> bytes:
    """``/bai/{namespace}/agents/{agent_id}``: one agent's record."""
    return agents_prefix(namespace) + _encode(agent_id)


def agent_config_prefix(namespace: str) -> bytes:
    """``/bai/{namespace}/config/agent/``: the secret and the cluster-wide tunables."""
    return namespace_prefix(namespace) + b"config/agent/"


def agent_config_key(namespace: str, name: str) -> bytes:
    """``/bai/{namespace}/config/agent/{name}``: one tunable (or the secret)."""
    return agent_config_prefix(namespace) + _encode(name)


def secret_key(namespace: str) -> bytes:
    """``/bai/{namespace}/config/agent/secret``: the namespace secret (hex)."""
    return agent_config_key(namespace, SECRET_NAME)


def registries_prefix(namespace: str) -> bytes:
    """``/bai/{namespace}/config/registries/``: credentials of image registries."""
    return namespace_prefix(namespace) + b"config/registries/"


def registry_key(namespace: str, registry: str) -> bytes:
    """``/bai/{namespace}/config/registries/{host[:port]}``: Json ``{"username", "password"}``."""
    return registries_prefix(namespace) + _encode(registry)


def name_under(prefix: bytes, key: bytes) -> str:
    """The part of ``key`` (a key under ``prefix``) after it, undecodable bytes replaced."""
    return key[len(prefix) :].decode("utf-8", "replace")
