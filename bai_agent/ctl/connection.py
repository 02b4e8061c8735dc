"""
How ``bai-agent-ctl`` reaches an agent: etcd at ``--etcd-addr``, the agent's AMP address
(its record in etcd, or a HOST:PORT given directly), the namespace secret (``--secret-file``,
else etcd), and an authenticated ``AgentClient``.
"""

from __future__ import annotations

import argparse
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.ctl.errors import CtlError
from bai_agent.etcd.interface import IEtcd
from bai_agent.protocol import errors
from bai_agent.protocol.auth import read_secret_file
from bai_agent.protocol.client import AgentClient
from bai_agent.protocol.discovery import list_agents, read_secret
from bai_agent.values import parse_host_port

if TYPE_CHECKING:
    from bai_agent.etcd.txetcd import TxEtcd


def etcd_client(reactor: Any, args: argparse.Namespace) -> TxEtcd:
    """A client of the etcd at ``--etcd-addr``; ``reactor``: what ``TxEtcd`` needs (TCP, time)."""
    # Imported here: only the commands that talk to etcd load txaioetcd.
    from bai_agent.etcd.txetcd import TxEtcd

    host, port = parse_host_port(args.etcd_addr)
    return TxEtcd(reactor, f"http://{host}:{port}")


@inlineCallbacks
def find_secret(args: argparse.Namespace, etcd: IEtcd) -> Generator[Deferred[Any], Any, str]:
    """The namespace secret: the one in ``--secret-file``, else the one in etcd."""
    if args.secret_file:
        try:
            return read_secret_file(args.secret_file)
        except ValueError as e:
            raise CtlError(str(e)) from e
    secret = yield read_secret(etcd, args.namespace)
    if not secret:
        raise CtlError(f"no secret in etcd for namespace {args.namespace!r}; pass --secret-file")
    return str(secret)


@inlineCallbacks
def find_address(args: argparse.Namespace, etcd: IEtcd) -> Generator[Deferred[Any], Any, str]:
    """The AMP address of ``args.agent``: itself when it is a HOST:PORT, else its record's."""
    if looks_like_address(args.agent):
        return str(args.agent)
    agents = yield list_agents(etcd, args.namespace)
    found = [agent for agent in agents if agent["agent_id"] == args.agent]
    if not found:
        known = sorted(str(agent["agent_id"]) for agent in agents)
        raise CtlError(
            f"no agent {args.agent!r} in namespace {args.namespace!r}; "
            + (
                f"the agents there: {', '.join(known)}"
                if known
                else f"no agent is registered there (is --etcd-addr {args.etcd_addr} right, and --namespace?)"
            )
        )
    address = found[0].get("amp_endpoint") or ""
    if not address:
        raise CtlError(f"agent {args.agent!r} has not published its AMP address yet")
    return str(address)


@inlineCallbacks
def connect(reactor: Any, args: argparse.Namespace, etcd: IEtcd) -> Generator[Deferred[Any], Any, AgentClient]:
    """
    An authenticated ``AgentClient`` of ``args.agent``, found through ``etcd``.
    ``reactor``: what ``AgentClient.connect`` needs (TCP, time).
    """
    secret = yield find_secret(args, etcd)
    address = yield find_address(args, etcd)
    try:
        client: AgentClient = yield AgentClient.connect(reactor, address, secret, timeout=args.timeout)
    except errors.AgentError as e:
        raise CtlError(f"{address}: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise CtlError(f"cannot reach agent at {address}: {e}") from e
    return client


@inlineCallbacks
def connect_alone(reactor: Any, args: argparse.Namespace) -> Generator[Deferred[Any], Any, AgentClient]:
    """An authenticated client, with the etcd connection used to find it closed again."""
    etcd = etcd_client(reactor, args)
    try:
        client: AgentClient = yield connect(reactor, args, etcd)
    finally:
        etcd.close()
    return client


def looks_like_address(value: str) -> bool:
    """Whether ``value`` is a HOST:PORT (rather than an agent id)."""
    try:
        parse_host_port(value)
    except ValueError:
        return False
    return True
