"""
``bai-agent-ctl``: a manager's view of the agents of a namespace, from the command line.

    bai-agent-ctl agents                 # agents registered in etcd
    bai-agent-ctl info AGENT             # the agent's record, over AMP
    bai-agent-ctl images AGENT           # its kernel images, over AMP
    bai-agent-ctl create AGENT KERNEL    # create a kernel (--image, --cpu, --mem, ...)
    bai-agent-ctl kernels AGENT          # list its kernels
    bai-agent-ctl destroy AGENT KERNEL   # destroy / restart one
    bai-agent-ctl events AGENT --follow  # print its events as they happen

AGENT is an agent id (looked up in etcd) or a HOST:PORT to dial directly. The etcd address,
namespace and secret are found like the agent finds them: ``--etcd-addr``, ``--namespace``,
``--secret-file`` (else the secret in etcd).
"""

import argparse
import datetime
import json
import sys

from twisted.internet.defer import Deferred, inlineCallbacks

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
    for name, text in (
        ("info", "show an agent's record"),
        ("images", "list an agent's kernel images"),
        ("kernels", "list an agent's kernels"),
    ):
        sub.add_parser(name, help=text).add_argument("agent", help="agent id, or HOST:PORT")
    create = sub.add_parser("create", help="create a kernel")
    create.add_argument("agent", help="agent id, or HOST:PORT")
    create.add_argument("kernel_id", help="the new kernel's id")
    create.add_argument("--image", default="bai-kernel/python:3.11", help="kernel image (default %(default)s)")
    create.add_argument("--cpu", type=float, help="cores (default: the agent's default, 1)")
    create.add_argument("--mem", help="memory, bytes or 512m, 2g (default: 512m)")
    create.add_argument("--gpus", type=int, help="NVIDIA devices")
    create.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeatable)")
    create.add_argument("--mount", action="append", default=[], metavar="SRC:DST[:ro|rw]", help="bind mount (repeatable)")
    create.add_argument("--idle-timeout", type=int, help="seconds without commands before it is destroyed (0: never)")
    create.add_argument("--exec-timeout", type=int, help="seconds one run may take (0: no limit)")
    for name, text in (("destroy", "destroy a kernel"), ("restart", "restart a kernel")):
        command = sub.add_parser(name, help=text)
        command.add_argument("agent", help="agent id, or HOST:PORT")
        command.add_argument("kernel_id")
    events = sub.add_parser("events", help="print an agent's events")
    events.add_argument("agent", help="agent id, or HOST:PORT")
    events.add_argument("--since", type=int, default=0, help="last seq already seen (default: all kept)")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    return parser


def _create_arguments(args) -> dict:
    resources = {}
    if args.cpu is not None:
        resources["cpu"] = args.cpu
    if args.mem is not None:
        resources["mem"] = int(args.mem) if args.mem.isdigit() else args.mem
    if args.gpus is not None:
        resources["cuda.device"] = args.gpus
    environ = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise CtlError(f"--env {item!r}: expected NAME=VALUE")
        environ[name] = value
    mounts = []
    for item in args.mount:
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise CtlError(f"--mount {item!r}: expected SRC:DST[:ro|rw]")
        mounts.append({"source": parts[0], "target": parts[1], "mode": parts[2] if len(parts) == 3 else "ro"})
    return {
        "kernel_id": args.kernel_id,
        "image": args.image,
        "resources": resources,
        "environ": environ or None,
        "mounts": mounts or None,
        "idle_timeout": args.idle_timeout,
        "exec_timeout": args.exec_timeout,
    }


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
            elif args.command == "kernels":
                kernels = yield client.list_kernels()
                if args.json:
                    out.write(json.dumps(kernels, indent=2) + "\n")
                else:
                    rows = [
                        [
                            kernel["kernel_id"],
                            kernel["image"],
                            kernel["status"],
                            kernel["resources"].get("cpu", "-"),
                            kernel["resources"].get("mem", "-"),
                            kernel["resources"].get("cpuset") or "-",
                            _time(kernel.get("created_at")),
                        ]
                        for kernel in kernels
                    ]
                    _table(rows, ["KERNEL", "IMAGE", "STATUS", "CPU", "MEM", "CPUSET", "CREATED (UTC)"], out)
            elif args.command == "create":
                record = yield client.create_kernel(**_create_arguments(args))
                out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            elif args.command == "destroy":
                answer = yield client.destroy_kernel(args.kernel_id)
                out.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")
            elif args.command == "restart":
                record = yield client.restart_kernel(args.kernel_id)
                out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            elif args.command == "events":
                yield _events(reactor, client, args, out)
        finally:
            client.close()
    finally:
        etcd.close()


@inlineCallbacks
def _events(reactor, client, args, out):
    """Print events as they are delivered; without --follow, stop once caught up."""
    caught_up = Deferred()
    state = {"last_seq": None}

    def on_event(event):
        out.write(json.dumps(event, sort_keys=True) + "\n")
        out.flush()
        if not args.follow and state["last_seq"] is not None and event["seq"] >= state["last_seq"]:
            if not caught_up.called:
                caught_up.callback(None)

    client.set_event_handler(on_event)
    try:
        state["last_seq"] = yield client.subscribe(args.since)
    except errors.EventsExpired as e:
        raise CtlError(f"events since {args.since} are no longer kept ({e}); use --since 0")
    if args.follow:
        yield client.disconnected
        raise CtlError("the agent closed the connection")
    if state["last_seq"] <= args.since:
        return
    yield caught_up


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
