"""
``bai-agent-ctl``'s command line: the argument parser, and ``main``, the command line's
composition root, as ``bai_agent.tap`` is the daemon's: the one place in the package that
takes the global reactor; everything else is handed it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from bai_agent.ctl import images, repl
from bai_agent.ctl.commands import run_command
from bai_agent.ctl.connection import connect_alone
from bai_agent.ctl.errors import CtlError
from bai_agent.ctl.output import DEFAULT_OUTPUT_DIR
from bai_agent.ctl.run import DEFAULT_FLUSH_TIMEOUT
from bai_agent.ctl.top import DEFAULT_INTERVAL as DEFAULT_TOP_INTERVAL
from bai_agent.etcd.interface import EtcdUnavailable

DESCRIPTION = (
    "A manager's view of the agents of a namespace, from the command line. AGENT is an agent id "
    "(looked up in etcd) or a HOST:PORT to dial directly; the namespace secret comes from "
    "--secret-file, else from etcd. 'bai-agent-ctl COMMAND --help' tells more of each command."
)
OUTPUT_DIR_HELP = "directory the pictures a run shows (plots) are saved in, as N.png, N.svg (default %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bai-agent-ctl", description=DESCRIPTION)
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
    top = sub.add_parser(
        "top",
        help="a live view of an agent's kernels: CPU, memory, status, age; busiest first",
        description="Show an agent's kernels with their CPU (percent of one core, and cores used of "
        "granted), memory (used of granted), processes, status and age, busiest first, redrawn every "
        "--interval seconds until Ctrl-C, like docker stats.",
    )
    top.add_argument("agent", help="agent id, or HOST:PORT")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument(
        "--interval", type=float, default=DEFAULT_TOP_INTERVAL, help="seconds between views (default %(default)s)"
    )
    events = sub.add_parser("events", help="print an agent's events")
    events.add_argument("agent", help="agent id, or HOST:PORT")
    events.add_argument("--since", type=int, default=0, help="last seq already seen (default: all kept)")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    run = sub.add_parser(
        "run",
        help="run code on a kernel, printing its output as it comes",
        description="Run code on a kernel: stdout and stderr as they come, input() answered from "
        "the terminal, Ctrl-C interrupts the run (twice: stop waiting); pictures (plots) are saved "
        "in the output directory and their paths printed where they came. The exit status is the "
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
    run.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR", help=OUTPUT_DIR_HELP)
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
    service = sub.add_parser("service", help="start, stop or list the services (Jupyter, ...) of a kernel")
    service.add_argument("action", choices=("start", "stop", "ls"))
    service.add_argument("agent", help="agent id, or HOST:PORT")
    service.add_argument("kernel_id")
    service.add_argument("name", nargs="?", help="the service (start and stop), e.g. jupyter")
    jupyter = sub.add_parser(
        "jupyter",
        help="create a data-science kernel, start Jupyter in it and print the URL to open",
        description="Create a kernel of the data-science image, start its Jupyter and print the URL "
        "(through the agent's relay: the kernel needs no network). The kernel lives on until "
        "destroyed (bai-agent-ctl destroy AGENT KERNEL) or idle for --idle-timeout seconds.",
    )
    jupyter.add_argument("agent", help="agent id, or HOST:PORT")
    jupyter.add_argument("--image", default="bai-kernel/python-sci:3.11", help="kernel image (default %(default)s)")
    jupyter.add_argument("--kernel-id", help="the kernel's id (default: jupyter-<random>)")
    jupyter.add_argument("--cpu", type=float, help="cores (default: the agent's default, 1)")
    jupyter.add_argument("--mem", default="2g", help="memory (default %(default)s)")
    jupyter.add_argument("--idle-timeout", type=int, default=0, help="seconds unused before it is destroyed (0: never)")
    images.add_parsers(sub)
    repl_parser = sub.add_parser(
        "repl",
        help="an interactive Python prompt on a new kernel",
        description="Create a kernel and type Python into it, like the Python prompt. "
        "Ctrl-D or exit() leaves; the kernel is destroyed however the prompt ends.",
    )
    repl_parser.add_argument("agent", help="agent id, or HOST:PORT")
    repl_parser.add_argument("--image", default="bai-kernel/python:3.11", help="kernel image (default %(default)s)")
    repl_parser.add_argument("--cpu", type=float, help="cores (default: the agent's default, 1)")
    repl_parser.add_argument("--mem", help="memory, bytes or 512m, 2g (default: 512m)")
    repl_parser.add_argument("--kernel-id", help="the kernel's id (default: repl-<random>)")
    repl_parser.add_argument(
        "--flush-timeout",
        type=float,
        default=DEFAULT_FLUSH_TIMEOUT,
        help="seconds the agent gathers output before sending it (default %(default)s)",
    )
    repl_parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR", help=OUTPUT_DIR_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``bai-agent-ctl``: carry out the command of ``argv`` (default: ``sys.argv``) and exit."""
    from twisted.internet import reactor
    from twisted.internet.task import react

    args = build_parser().parse_args(argv)
    if args.command in ("run", "repl"):
        # What a run prints is shown, whatever the terminal's encoding cannot show.
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
    if args.command == "repl":
        # The reactor is run in a thread of its own, beside the terminal in the main thread.
        raise SystemExit(
            repl.main(reactor, args, lambda reactor: connect_alone(reactor, args), user_errors=(CtlError,))
        )

    def command(reactor: Any) -> Deferred[None]:
        d = run_command(reactor, args, sys.stdout)

        def exit_status(status: int | None) -> None:
            if status:
                raise SystemExit(status)

        def report(failure: Failure) -> Failure:
            if isinstance(failure.value, SystemExit):
                return failure
            if isinstance(failure.value, CtlError):
                sys.stderr.write(f"bai-agent-ctl: {failure.value}\n")
            elif isinstance(failure.value, EtcdUnavailable):
                sys.stderr.write(
                    f"bai-agent-ctl: cannot reach etcd at {args.etcd_addr} (--etcd-addr): {failure.value}\n"
                )
            else:
                sys.stderr.write(f"bai-agent-ctl: {type(failure.value).__name__}: {failure.getErrorMessage()}\n")
            raise SystemExit(1)

        return d.addCallback(exit_status).addErrback(report)

    react(command, [], _reactor=reactor)
