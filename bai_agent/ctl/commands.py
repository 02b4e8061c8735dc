"""
The commands of ``bai-agent-ctl`` but ``repl``: ``agents`` (etcd only), and those that are
a few calls to one agent (info, images, kernels, create, destroy, restart, stats, events,
interrupt, upload, download, ls, logs, and ``run`` and ``top`` through ``bai_agent.ctl.run``
and ``bai_agent.ctl.top``).
``run_command`` carries out one parsed command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
from collections.abc import Generator, Sequence
from typing import IO, Any, BinaryIO

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.ctl import images as image_commands
from bai_agent.ctl.connection import connect, etcd_client
from bai_agent.ctl.errors import CtlError
from bai_agent.ctl.run import read_code, run_code
from bai_agent.ctl.top import top
from bai_agent.protocol import errors
from bai_agent.protocol.discovery import list_agents

CHUNK = 1 << 20  # the most UploadFile and DownloadFile move in one call


@inlineCallbacks
def run_command(
    reactor: Any,
    args: argparse.Namespace,
    out: IO[str],
    err: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> Generator[Deferred[Any], Any, int | None]:
    """
    Carry out one command; fires with the exit status when it is not 0 (or None).
    ``reactor``: what ``TxEtcd`` and ``AgentClient`` need (TCP, time), and threads for ``run``.
    """
    err = err or sys.stderr
    stdin = stdin or sys.stdin
    if args.command == "top" and not args.interval > 0:
        raise CtlError("--interval must be more than 0 seconds")
    if args.command == "run":
        # The code is read first: a missing file is an error before any connection.
        mode, code, options = read_code(args, stdin)
    etcd = etcd_client(reactor, args)
    try:
        if args.command == "agents":
            agents = yield list_agents(etcd, args.namespace)
            if args.json:
                out.write(json.dumps(agents, indent=2) + "\n")
                return None
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
            return None
        client = yield connect(reactor, args, etcd)
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
                record = yield client.create_kernel(**create_arguments(args))
                out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            elif args.command == "destroy":
                answer = yield client.destroy_kernel(args.kernel_id)
                out.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")
            elif args.command == "restart":
                record = yield client.restart_kernel(args.kernel_id)
                out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            elif args.command == "stats":
                stats = yield client.get_kernel_stats(args.kernel_id)
                out.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
            elif args.command == "events":
                yield print_events(client, args, out)
            elif args.command == "top":
                yield top(reactor, client, args, out)
            elif args.command == "interrupt":
                yield client.interrupt_kernel(args.kernel_id)
            elif args.command == "upload":
                size = yield upload(client, args)
                out.write(f"{size} bytes\n")
            elif args.command == "download":
                yield download(client, args, out)
            elif args.command == "ls":
                entries = yield client.list_files(args.kernel_id, args.path)
                if args.json:
                    out.write(json.dumps(entries, indent=2) + "\n")
                else:
                    rows = [
                        [oct(entry["mode"])[2:], entry["type"], entry["size"], _time(entry["mtime"]), entry["name"]]
                        for entry in entries
                    ]
                    _table(rows, ["MODE", "TYPE", "SIZE", "MODIFIED (UTC)", "NAME"], out)
            elif args.command == "logs":
                text = yield client.get_logs(args.kernel_id, tail=args.tail)
                out.write(text)
            elif args.command == "service":
                yield service(client, args, out)
            elif args.command == "jupyter":
                yield jupyter(client, args, out)
            elif args.command == "pull":
                yield image_commands.pull(client, args, out, stdin)
            elif args.command == "rmi":
                yield image_commands.remove(client, args, out)
            elif args.command == "run":
                status: int = yield run_code(reactor, client, args, mode, code, options, out, err, stdin)
                return status
        finally:
            client.close()
    finally:
        etcd.close()
    return None


# -- services ----------------------------------------------------------------------------------


@inlineCallbacks
def service(client: Any, args: argparse.Namespace, out: IO[str]) -> Generator[Deferred[Any], Any, None]:
    """``service start|stop|ls AGENT KERNEL [NAME]``."""
    if args.action == "ls":
        services = yield client.list_services(args.kernel_id)
        if args.json:
            out.write(json.dumps(services, indent=2) + "\n")
            return
        rows = [
            [s["name"], s["protocol"], s["container_port"], s["status"], _endpoint(s), s.get("url") or "-"]
            for s in services
        ]
        _table(rows, ["SERVICE", "PROTOCOL", "CONTAINER PORT", "STATUS", "HOST PORT", "URL"], out)
        return
    if not args.name:
        raise CtlError(f"service {args.action} needs the service's name, e.g. jupyter")
    if args.action == "start":
        answer = yield client.start_service(args.kernel_id, args.name)
        out.write((answer.get("url") or f"{answer['host']}:{answer['port']}") + "\n")
    else:
        yield client.stop_service(args.kernel_id, args.name)


@inlineCallbacks
def jupyter(client: Any, args: argparse.Namespace, out: IO[str]) -> Generator[Deferred[Any], Any, None]:
    """Create a kernel of the data-science image, start Jupyter in it, print its URL."""
    kernel_id = args.kernel_id or f"jupyter-{secrets.token_hex(4)}"
    resources: dict[str, Any] = {"mem": args.mem}
    if args.cpu is not None:
        resources["cpu"] = args.cpu
    yield client.create_kernel(kernel_id, args.image, resources, idle_timeout=args.idle_timeout)
    try:
        answer = yield client.start_service(kernel_id, "jupyter")
    except Exception:
        yield client.destroy_kernel(kernel_id)
        raise
    out.write(f"kernel {kernel_id}: Jupyter at\n{answer['url']}\n")


def _endpoint(entry: dict[str, Any]) -> str:
    return f"{entry['host']}:{entry['port']}" if entry.get("port") else "-"


# -- kernels ------------------------------------------------------------------------------------


def kernel_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The ``resources`` of ``--cpu`` and ``--mem`` (of ``repl`` and ``create``)."""
    resources: dict[str, Any] = {}
    if getattr(args, "cpu", None) is not None:
        resources["cpu"] = args.cpu
    if getattr(args, "mem", None) is not None:
        resources["mem"] = int(args.mem) if str(args.mem).isdigit() else args.mem
    return resources


def create_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of ``AgentClient.create_kernel`` that ``create``'s options ask for."""
    resources = kernel_resources(args)
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


# -- files --------------------------------------------------------------------------------------


@inlineCallbacks
def upload(client: Any, args: argparse.Namespace) -> Generator[Deferred[Any], Any, int]:
    """Send a local file in 1 MiB calls; fires with the size in the kernel."""
    target = args.target or os.path.basename(args.source)
    if not target or args.source == "-" and not args.target:
        raise CtlError("upload from stdin needs a target path")
    source: BinaryIO
    try:
        source = sys.stdin.buffer if args.source == "-" else open(args.source, "rb")
    except OSError as e:
        raise CtlError(f"cannot read {args.source}: {e.strerror}") from e
    size = 0
    first = True
    try:
        while True:
            chunk = source.read(CHUNK)
            if not chunk and not first:
                break
            answer = yield client.upload_file(args.kernel_id, target, chunk, append=not first)
            size = answer["size"]
            first = False
            if len(chunk) < CHUNK:
                break
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    return size


@inlineCallbacks
def download(client: Any, args: argparse.Namespace, out: IO[str]) -> Generator[Deferred[Any], Any, None]:
    """Fetch a file in 1 MiB calls into a local file (or stdout)."""
    target = args.target or os.path.basename(args.source.rstrip("/"))
    if not target:
        raise CtlError("download needs a target path")
    sink: BinaryIO
    try:
        sink = sys.stdout.buffer if target == "-" else open(target + ".part", "wb")
    except OSError as e:
        raise CtlError(f"cannot write {target}: {e.strerror}") from e
    offset = 0
    try:
        while True:
            answer = yield client.download_file(args.kernel_id, args.source, offset=offset, length=CHUNK)
            sink.write(answer["data"])
            offset += len(answer["data"])
            if answer["eof"] or not answer["data"]:
                break
    except BaseException:
        if sink is not sys.stdout.buffer:
            sink.close()
            os.unlink(target + ".part")
        raise
    if sink is not sys.stdout.buffer:
        sink.close()
        os.replace(target + ".part", target)  # never a half file under the real name
        out.write(f"{offset} bytes to {target}\n")


# -- events -------------------------------------------------------------------------------------


@inlineCallbacks
def print_events(client: Any, args: argparse.Namespace, out: IO[str]) -> Generator[Deferred[Any], Any, None]:
    """Print events as they are delivered; without --follow, stop once caught up."""
    caught_up: Deferred[None] = Deferred()
    last_seq: int | None = None

    def on_event(event: dict[str, Any]) -> None:
        out.write(json.dumps(event, sort_keys=True) + "\n")
        out.flush()
        if not args.follow and last_seq is not None and event["seq"] >= last_seq:
            if not caught_up.called:
                caught_up.callback(None)

    client.set_event_handler(on_event)
    try:
        last_seq = yield client.subscribe(args.since)
    except errors.EventsExpired as e:
        raise CtlError(f"events since {args.since} are no longer kept ({e}); use --since 0") from e
    if args.follow:
        yield client.disconnected
        raise CtlError("the agent closed the connection")
    if last_seq is None or last_seq <= args.since:
        return
    yield caught_up


# -- tables -------------------------------------------------------------------------------------


def _time(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[Any]], headers: Sequence[str], out: IO[str]) -> None:
    lines: list[Sequence[Any]] = [headers, *rows]
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(headers))]
    for row in lines:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _resource(record: dict[str, Any], slot: str) -> str:
    amounts = record.get("resources", {}).get(slot, {})
    return f"{amounts.get('used', '-')}/{amounts.get('capacity', '-')}"
