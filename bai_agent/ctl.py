"""
``bai-agent-ctl``: a manager's view of the agents of a namespace, from the command line.

    bai-agent-ctl agents                 # agents registered in etcd
    bai-agent-ctl info AGENT             # the agent's record, over AMP
    bai-agent-ctl images AGENT           # its kernel images, over AMP

AGENT is an agent id (looked up in etcd) or a HOST:PORT to dial directly. The etcd address,
namespace and secret are found like the agent finds them: ``--etcd-addr``, ``--namespace``,
``--secret-file`` (else the secret in etcd).
"""

import argparse
import datetime
import json
import sys

from twisted.internet.defer import inlineCallbacks

from bai_agent.config import parse_host_port
from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.protocol.discovery import list_agents, read_secret


class CtlError(Exception):
    """A failure to report to the user in one line, with exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bai-agent-ctl", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--etcd-addr", default="127.0.0.1:2379", help="etcd HOST:PORT (default %(default)s)")
    parser.add_argument("--namespace", default="local", help="cluster namespace (default %(default)s)")
    parser.add_argument("--secret-file", help="file holding the namespace secret (default: read it from etcd)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an agent")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("agents", help="list the agents registered in etcd")
    for name, text in (("info", "show an agent's record"), ("images", "list an agent's kernel images")):
        sub.add_parser(name, help=text).add_argument("agent", help="agent id, or HOST:PORT")
    return parser


def _etcd(reactor, args):
    from bai_agent.etcd.txetcd import TxEtcd

    host, port = parse_host_port(args.etcd_addr)
    return TxEtcd(reactor, f"http://{host}:{port}")


@inlineCallbacks
def _connect(reactor, args, etcd):
    if args.secret_file:
        try:
            with open(args.secret_file) as secret_file:
                secret = secret_file.read().strip()
        except OSError as e:
            raise CtlError(f"cannot read {args.secret_file}: {e.strerror}")
    else:
        secret = yield read_secret(etcd, args.namespace)
        if not secret:
            raise CtlError(f"no secret in etcd for namespace {args.namespace!r}; pass --secret-file")
    address = args.agent
    if not _looks_like_address(address):
        agents = yield list_agents(etcd, args.namespace)
        found = [agent for agent in agents if agent["agent_id"] == address]
        if not found:
            raise CtlError(f"no agent {address!r} in namespace {args.namespace!r}")
        address = found[0].get("amp_endpoint") or ""
        if not address:
            raise CtlError(f"agent {args.agent!r} has not published its AMP address yet")
    try:
        client = yield AgentClient.connect(reactor, address, secret, timeout=args.timeout)
    except errors.AgentError as e:
        raise CtlError(f"{address}: {type(e).__name__}: {e}")
    except Exception as e:
        raise CtlError(f"cannot reach agent at {address}: {e}")
    return client


def _looks_like_address(value: str) -> bool:
    try:
        parse_host_port(value)
    except ValueError:
        return False
    return True


def _time(ts):
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows, headers, out):
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    for row in [headers] + rows:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _resource(record, slot):
    amounts = record.get("resources", {}).get(slot, {})
    return f"{amounts.get('used', '-')}/{amounts.get('capacity', '-')}"


@inlineCallbacks
def run(reactor, args, out):
    etcd = _etcd(reactor, args)
    try:
        if args.command == "agents":
            agents = yield list_agents(etcd, args.namespace)
            if args.json:
                out.write(json.dumps(agents, indent=2) + "\n")
                return
            rows = [
                [
                    agent["agent_id"],
                    agent.get("status", "-"),
                    agent.get("amp_endpoint", "-"),
                    _resource(agent, "cpu"),
                    _resource(agent, "cuda.device"),
                    agent.get("kernels", "-"),
                    _time(agent.get("heartbeat_at")),
                ]
                for agent in agents
            ]
            _table(rows, ["AGENT", "STATUS", "AMP", "CPU", "GPU", "KERNELS", "HEARTBEAT (UTC)"], out)
            return
        client = yield _connect(reactor, args, etcd)
        try:
            if args.command == "info":
                info = yield client.get_agent_info()
                out.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
            elif args.command == "images":
                images = yield client.list_images()
                if args.json:
                    out.write(json.dumps(images, indent=2) + "\n")
                else:
                    rows = [[image["name"], image["runtime_type"], image["id"][:19]] for image in images]
                    _table(rows, ["IMAGE", "RUNTIME", "ID"], out)
        finally:
            client.close()
    finally:
        etcd.close()


def main(argv=None):
    from twisted.internet.task import react

    args = build_parser().parse_args(argv)

    def command(reactor):
        d = run(reactor, args, sys.stdout)

        def report(failure):
            if failure.check(CtlError):
                sys.stderr.write(f"bai-agent-ctl: {failure.value}\n")
            else:
                sys.stderr.write(f"bai-agent-ctl: {failure.type.__name__}: {failure.getErrorMessage()}\n")
            raise SystemExit(1)

        return d.addErrback(report)

    react(command, [])


if __name__ == "__main__":
    main()
