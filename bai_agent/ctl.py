"""
``bai-agent-ctl``: a manager's view of the agents of a namespace, from the command line.

    bai-agent-ctl agents                 # agents registered in etcd
    bai-agent-ctl info AGENT             # the agent's record, over AMP
    bai-agent-ctl images AGENT           # its kernel images, over AMP
    bai-agent-ctl create AGENT KERNEL    # create a kernel (--image, --cpu, --mem, ...)
    bai-agent-ctl kernels AGENT          # list its kernels
    bai-agent-ctl destroy AGENT KERNEL   # destroy / restart one
    bai-agent-ctl stats AGENT KERNEL     # its latest statistics sample
    bai-agent-ctl events AGENT --follow  # print its events as they happen
    bai-agent-ctl run AGENT KERNEL -c CODE   # run code, output as it comes (or FILE)
    bai-agent-ctl upload/download/ls/logs AGENT KERNEL ...
    bai-agent-ctl repl AGENT             # a Python prompt on a new kernel
    bai-agent-ctl run AGENT KERNEL -c CODE  # run code (or FILE; - is stdin), output as it comes
    bai-agent-ctl interrupt AGENT KERNEL    # interrupt the run active on a kernel
    bai-agent-ctl repl AGENT             # a Python prompt on a new kernel, destroyed at the end

AGENT is an agent id (looked up in etcd) or a HOST:PORT to dial directly. The etcd address,
namespace and secret are found like the agent finds them: ``--etcd-addr``, ``--namespace``,
``--secret-file`` (else the secret in etcd).
"""

import argparse
import datetime
import json
import os
import signal
import sys

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.protocol.discovery import list_agents, read_secret
from bai_agent.repl import (
    DEFAULT_FLUSH_TIMEOUT,
    EXIT_INTERRUPTED,
    KernelRun,
    LineSource,
    StreamTerminal,
    repl_resources,
)
from bai_agent.values import parse_host_port


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
    create.add_argument(
        "--mount", action="append", default=[], metavar="SRC:DST[:ro|rw]", help="bind mount (repeatable)"
    )
    create.add_argument("--idle-timeout", type=int, help="seconds without commands before it is destroyed (0: never)")
    create.add_argument("--exec-timeout", type=int, help="seconds one run may take (0: no limit)")
    for name, text in (
        ("destroy", "destroy a kernel"),
        ("restart", "restart a kernel"),
        ("stats", "a kernel's latest statistics"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("agent", help="agent id, or HOST:PORT")
        command.add_argument("kernel_id")
    events = sub.add_parser("events", help="print an agent's events")
    events.add_argument("agent", help="agent id, or HOST:PORT")
    events.add_argument("--since", type=int, default=0, help="last seq already seen (default: all kept)")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    run = sub.add_parser(
        "run",
        help="run code on a kernel, printing its output as it comes",
        description="Run code on a kernel: stdout and stderr as they come, input() answered from "
        "the terminal, Ctrl-C interrupts the run (twice: stop waiting). The exit status is the "
        "run's exit code (124 when it exceeded the kernel's exec timeout).",
    )
    run.add_argument("agent", help="agent id, or HOST:PORT")
    run.add_argument("kernel_id")
    run.add_argument("file", nargs="?", help="file holding the code ('-': standard input)")
    run.add_argument("-c", dest="code", metavar="CODE", help="the code to run")
    run.add_argument(
        "--batch",
        action="store_true",
        help="batch mode: --build, then --exec (or the code as a shell script), instead of the interpreter",
    )
    run.add_argument("--build", metavar="CMD", help="batch mode: shell command run first")
    run.add_argument("--exec", dest="exec_command", metavar="CMD", help="batch mode: shell command run next")
    run.add_argument(
        "--flush-timeout",
        type=float,
        default=DEFAULT_FLUSH_TIMEOUT,
        help="seconds the agent gathers output before sending it (default %(default)s)",
    )
    interrupt = sub.add_parser("interrupt", help="interrupt the run active on a kernel")
    interrupt.add_argument("agent", help="agent id, or HOST:PORT")
    interrupt.add_argument("kernel_id")
    upload = sub.add_parser("upload", help="copy a local file into a kernel's home")
    upload.add_argument("agent", help="agent id, or HOST:PORT")
    upload.add_argument("kernel_id")
    upload.add_argument("source", help="local file (- for stdin)")
    upload.add_argument("target", nargs="?", help="path under /home/work (default: the file's name)")
    download = sub.add_parser("download", help="copy a file out of a kernel's home")
    download.add_argument("agent", help="agent id, or HOST:PORT")
    download.add_argument("kernel_id")
    download.add_argument("source", help="path under /home/work")
    download.add_argument("target", nargs="?", help="local file (default: the file's name; - for stdout)")
    listing = sub.add_parser("ls", help="list a directory of a kernel's home")
    listing.add_argument("agent", help="agent id, or HOST:PORT")
    listing.add_argument("kernel_id")
    listing.add_argument("path", nargs="?", default=".", help="path under /home/work (default: the home)")
    logs = sub.add_parser("logs", help="print a kernel's container log")
    logs.add_argument("agent", help="agent id, or HOST:PORT")
    logs.add_argument("kernel_id")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    repl = sub.add_parser(
        "repl",
        help="an interactive Python prompt on a new kernel",
        description="Create a kernel and type Python into it, like the Python prompt. "
        "Ctrl-D or exit() leaves; the kernel is destroyed however the prompt ends.",
    )
    repl.add_argument("agent", help="agent id, or HOST:PORT")
    repl.add_argument("--image", default="bai-kernel/python:3.11", help="kernel image (default %(default)s)")
    repl.add_argument("--cpu", type=float, help="cores (default: the agent's default, 1)")
    repl.add_argument("--mem", help="memory, bytes or 512m, 2g (default: 512m)")
    repl.add_argument("--kernel-id", help="the kernel's id (default: repl-<random>)")
    repl.add_argument(
        "--flush-timeout",
        type=float,
        default=DEFAULT_FLUSH_TIMEOUT,
        help="seconds the agent gathers output before sending it (default %(default)s)",
    )
    return parser


CHUNK = 1 << 20  # the most UploadFile and DownloadFile move in one call


@inlineCallbacks
def _upload(client, args):
    """Send a local file in 1 MiB calls; fires with the size in the kernel."""
    target = args.target or os.path.basename(args.source)
    if not target or args.source == "-" and not args.target:
        raise CtlError("upload from stdin needs a target path")
    try:
        source = sys.stdin.buffer if args.source == "-" else open(args.source, "rb")
    except OSError as e:
        raise CtlError(f"cannot read {args.source}: {e.strerror}")
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
def _download(client, args, out):
    """Fetch a file in 1 MiB calls into a local file (or stdout)."""
    target = args.target or os.path.basename(args.source.rstrip("/"))
    if not target:
        raise CtlError("download needs a target path")
    try:
        sink = sys.stdout.buffer if target == "-" else open(target + ".part", "wb")
    except OSError as e:
        raise CtlError(f"cannot write {target}: {e.strerror}")
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


def read_code(args, stdin=None):
    """The code and execution options that ``run``'s arguments ask for."""
    if args.code is not None and args.file is not None:
        raise CtlError("give the code either with -c or as FILE, not both")
    if not args.batch and (args.build is not None or args.exec_command is not None):
        raise CtlError("--build and --exec are for batch mode: add --batch")
    if args.flush_timeout < 0:
        raise CtlError("--flush-timeout must not be negative")
    code = args.code
    if args.file == "-":
        code = (stdin or sys.stdin).read()
    elif args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as source:
                code = source.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CtlError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}")
    if args.batch:
        if code is None and args.exec_command is None:
            raise CtlError("batch mode needs --exec CMD, or code (-c CODE or FILE) to run as a shell script")
        options = {key: value for key, value in (("build", args.build), ("exec", args.exec_command)) if value}
        return "batch", code or "", options
    if code is None:
        raise CtlError("no code: give -c CODE, or FILE ('-' for standard input)")
    return "query", code, {}


def _create_arguments(args) -> dict:
    resources = repl_resources(args)
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
def run(reactor, args, out, err=None, stdin=None):
    """Carry out one command; fires with the exit status when it is not 0 (or None)."""
    err = err or sys.stderr
    stdin = stdin or sys.stdin
    if args.command == "run":
        # The code is read first: a missing file is an error before any connection.
        mode, code, options = read_code(args, stdin)
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
            elif args.command == "stats":
                stats = yield client.get_kernel_stats(args.kernel_id)
                out.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
            elif args.command == "events":
                yield _events(reactor, client, args, out)
            elif args.command == "interrupt":
                yield client.interrupt_kernel(args.kernel_id)
            elif args.command == "upload":
                size = yield _upload(client, args)
                out.write(f"{size} bytes\n")
            elif args.command == "download":
                yield _download(client, args, out)
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
            elif args.command == "run":
                status = yield _run_code(reactor, client, args, mode, code, options, out, err, stdin)
                return status
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


@inlineCallbacks
def _run_code(reactor, client, args, mode, code, options, out, err, stdin):
    """
    Run code and show it as it comes; the exit status. The first Ctrl-C interrupts the
    run (which then ends with 130, unless its code catches it); a second stops waiting.
    """
    if args.file == "-":
        # Standard input held the code: input() lines come from the terminal, if any.
        lines = LineSource(reactor, lambda: open("/dev/tty", encoding="utf-8", errors="replace"))
    else:
        lines = LineSource(reactor, lambda: stdin)
    kernel_run = KernelRun(client, args.kernel_id, StreamTerminal(reactor, out, err, lines), args.flush_timeout)
    ended = Deferred()
    presses = []

    def on_interrupt():
        presses.append(None)
        if len(presses) == 1:
            err.write("\nbai-agent-ctl: interrupting the run (Ctrl-C again to stop waiting for it)\n")
            err.flush()
            kernel_run.interrupt().addErrback(lambda failure: failure.trap(errors.KernelNotRunning))
        elif not ended.called:
            err.write(f"\nbai-agent-ctl: stopped waiting; the run may still be active on kernel {args.kernel_id}\n")
            ended.callback(EXIT_INTERRUPTED)

    def relay(result):
        # After a second Ctrl-C nobody waits for how the run ends any more.
        if not ended.called:
            ended.callback(result)

    # Python calls the handler in the main thread, between two of the reactor's steps; the
    # work is handed to the reactor like any other event.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: reactor.callFromThread(on_interrupt))
    try:
        kernel_run.start(mode, code, options).addBoth(relay)
        try:
            result = yield ended
        except errors.RunConflict as e:
            raise CtlError(f"kernel {args.kernel_id} is busy: {e}")
    finally:
        signal.signal(signal.SIGINT, previous)
    if isinstance(result, int):
        return result
    if result.status == "exec-timeout":
        err.write(f"bai-agent-ctl: the run exceeded the exec timeout of kernel {args.kernel_id}\n")
    return result.exit_status


@inlineCallbacks
def _connect_alone(reactor, args):
    """An authenticated client, with the etcd connection used to find it closed again."""
    etcd = _etcd(reactor, args)
    try:
        client = yield _connect(reactor, args, etcd)
    finally:
        etcd.close()
    return client


def main(argv=None):
    from twisted.internet.task import react

    args = build_parser().parse_args(argv)
    if args.command in ("run", "repl"):
        # What a run prints is shown, whatever the terminal's encoding cannot show.
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
    if args.command == "repl":
        # The command line's composition root, as tap.py is the daemon's: the one place
        # that takes the global reactor, to run it in a thread beside the terminal.
        from twisted.internet import reactor

        from bai_agent.repl import main as repl_main

        raise SystemExit(
            repl_main(reactor, args, lambda reactor: _connect_alone(reactor, args), user_errors=(CtlError,))
        )

    def command(reactor):
        d = run(reactor, args, sys.stdout)

        def exit_status(status):
            if status:
                raise SystemExit(status)

        def report(failure):
            if failure.check(SystemExit):
                return failure
            if failure.check(CtlError):
                sys.stderr.write(f"bai-agent-ctl: {failure.value}\n")
            else:
                sys.stderr.write(f"bai-agent-ctl: {failure.type.__name__}: {failure.getErrorMessage()}\n")
            raise SystemExit(1)

        return d.addCallback(exit_status).addErrback(report)

    react(command, [])


if __name__ == "__main__":
    main()
