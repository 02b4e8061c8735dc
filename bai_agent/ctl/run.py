"""
``bai-agent-ctl run``: code run on a kernel, shown as it runs.

``KernelRun`` drives one run (PROTOCOL.md section 2) on the reactor. It starts the run with
a short ``flush_timeout`` and collects it with ``continue`` calls, so that output shows as
it comes; it answers ``waiting-input`` from a *terminal*; ``interrupt()`` sends
``InterruptKernel``. A terminal is anything with ``show(console)`` and
``read_input(prompt, is_password) -> Deferred`` (a cancellable Deferred of the line); the
REPL (``bai_agent.ctl.repl``) drives its runs with a terminal of its own.

``run_code`` keeps the reactor in the main thread (``react``): it reads input lines in
daemon threads (``LineSource``), and its SIGINT handler hands Ctrl-C to the reactor.
"""

from __future__ import annotations

import argparse
import collections
import getpass
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from types import FrameType
from typing import IO, Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from bai_agent.ctl.errors import CtlError
from bai_agent.ctl.output import DEFAULT_OUTPUT_DIR, ConsoleView, OutputDir
from bai_agent.protocol import errors

#: Seconds an ``Execute`` call waits before it returns the output so far: short, so that a
#: person sees output as it comes.
DEFAULT_FLUSH_TIMEOUT = 0.2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

#: One ``[type, data]`` entry of a run's console, as the agent sends it.
ConsoleEntry = Sequence[Any]


class Terminal(Protocol):
    """What a run shows its output on and asks its ``input()`` lines from."""

    def show(self, console: Sequence[ConsoleEntry]) -> None: ...

    def read_input(self, prompt: str, is_password: bool) -> Deferred[str | None]: ...


# -- what a terminal shows ----------------------------------------------------------------------


def split_prompt(console: object) -> tuple[list[Any], str]:
    """
    ``(console, prompt)``: the end of the last stdout entry after its last newline is what
    ``input()`` printed as its prompt. Handing it to the line reader rather than printing
    it lets readline redraw the line properly (and getpass print it where it reads).
    """
    if not isinstance(console, (list, tuple)):
        return ([] if console is None else [console]), ""  # not a list: the terminal reports it
    # A malformed entry is kept as it is, for the terminal to report.
    entries = [list(entry) if isinstance(entry, (list, tuple)) else entry for entry in console]
    last = entries[-1] if entries else None
    if not (isinstance(last, list) and len(last) == 2 and last[0] == "stdout" and isinstance(last[1], str)):
        return entries, ""
    text = entries[-1][1]
    head, newline, prompt = text.rpartition("\n")
    if newline:
        entries[-1][1] = head + newline
    else:
        entries.pop()
    return entries, prompt


# -- one run, on the reactor ------------------------------------------------------------------


@attrs.frozen
class RunResult:
    """How a run ended: its last status (``finished`` or ``exec-timeout``) and exit code."""

    status: str
    exit_code: int | None = None

    @property
    def exit_status(self) -> int:
        """The exit status for a command that ran it: 124 for a timeout, else the code."""
        if self.status == "exec-timeout":
            return EXIT_TIMEOUT
        if self.exit_code is None:
            return 0
        return self.exit_code if 0 <= self.exit_code <= 255 else 1


class KernelRun:
    """
    One run on a kernel, driven to its end: output goes to ``terminal.show`` answer by
    answer, ``waiting-input`` is answered with ``terminal.read_input``.

    :param client: an ``AgentClient`` (or anything with ``execute`` and ``interrupt_kernel``).
    """

    def __init__(self, client: Any, kernel_id: str, terminal: Terminal, flush_timeout: float = DEFAULT_FLUSH_TIMEOUT):
        self.client = client
        self.kernel_id = kernel_id
        self.terminal = terminal
        self.flush_timeout = flush_timeout
        self.run_id: str | None = None
        # The terminal's pending read, while the run waits for input.
        self._input: Deferred[str | None] | None = None

    @inlineCallbacks
    def start(
        self, mode: str, code: str = "", options: dict[str, Any] | None = None
    ) -> Generator[Deferred[Any], Any, RunResult]:
        """Run ``code`` in ``mode`` (``query`` or ``batch``); fires with a ``RunResult``."""
        options = dict(options or {}, flush_timeout=self.flush_timeout)
        answer = yield self.client.execute(self.kernel_id, mode, code, options=options)
        self.run_id = answer["run_id"]
        collect = {"flush_timeout": self.flush_timeout}
        while True:
            status = answer["status"]
            console = answer.get("console") or []
            if status == "waiting-input":
                console, prompt = split_prompt(console)
                self.terminal.show(console)
                is_password = bool((answer.get("options") or {}).get("is_password"))
                text = yield self._read_input(prompt, is_password)
                mode, code = ("continue", "") if text is None else ("input", text)
            else:
                self.terminal.show(console)
                if status in ("finished", "exec-timeout"):
                    return RunResult(status, answer.get("exit_code"))
                # continued, build-finished (and statuses this client does not know yet)
                mode, code = "continue", ""
            answer = yield self.client.execute(self.kernel_id, mode, code, run_id=self.run_id, options=collect)

    @inlineCallbacks
    def _read_input(self, prompt: str, is_password: bool) -> Generator[Deferred[Any], Any, str | None]:
        self._input = self.terminal.read_input(prompt, is_password)
        try:
            text: str | None = yield self._input
            return text
        except CancelledError:
            return None  # interrupted while waiting for the line: collect how the run ends
        finally:
            self._input = None

    def interrupt(self) -> Deferred[Any]:
        """
        Send ``InterruptKernel``. The run then ends (exit code 130) unless its code catches
        the ``KeyboardInterrupt``; a line the terminal was still asked for is not needed any
        more, so that read is cancelled once the kernel has the interrupt.
        """

        def sent(result: object) -> object:
            if self._input is not None:
                self._input.cancel()
            return result

        d: Deferred[Any] = self.client.interrupt_kernel(self.kernel_id)
        return d.addCallback(sent)


def ignore_not_running(failure: Failure) -> Failure | None:
    """An errback of ``interrupt()``: a run that has ended already is no error."""
    if not isinstance(failure.value, errors.KernelNotRunning):
        return failure
    return None


# -- the terminal of ``run``: the reactor in the main thread --------------------------------


class LineSource:
    """
    Lines of a blocking text file (standard input, or the terminal), each read by a daemon
    thread when asked for, so that the reactor never waits on it. A line that arrives after
    its read was cancelled is kept for the next read. ``read_line`` fires with None at the
    end of the file.

    :param reactor: ``IReactorFromThreads``.
    :param open_file: called in the reading thread, returns the file to read.
    """

    def __init__(self, reactor: IReactorFromThreads, open_file: Callable[[], IO[str]]):
        self.reactor = reactor
        self.open_file = open_file
        self._file: IO[str] | None = None
        self._lines: collections.deque[str] = collections.deque()
        self._waiting: Deferred[str | None] | None = None
        self._reading = False
        self._eof = False

    def read_line(self) -> Deferred[str | None]:
        if self._lines:
            return succeed(self._lines.popleft())
        if self._eof:
            return succeed(None)
        self._waiting = Deferred()
        if not self._reading:
            self._reading = True
            threading.Thread(target=self._read, name="bai-ctl-input", daemon=True).start()
        return self._waiting

    def _read(self) -> None:
        try:
            if self._file is None:
                self._file = self.open_file()
            line = self._file.readline()
        except (OSError, ValueError):
            line = ""
        self.reactor.callFromThread(self._arrived, line)

    def _arrived(self, line: str) -> None:
        self._reading = False
        text: str | None
        if line:
            text = line[:-1] if line.endswith("\n") else line
        else:
            self._eof, text = True, None
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.callback(text)
        elif text is not None:
            self._lines.append(text)


class StreamTerminal:
    """
    What ``bai-agent-ctl run`` shows and reads: output to ``stdout``/``stderr`` as it comes
    (pictures saved in ``output``, see ``bai_agent.ctl.output``), input lines from ``lines``
    (a ``LineSource``), passwords with ``getpass`` (no echo) in a daemon thread. When the
    input has ended, ``input()`` gets an empty line.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        stdout: IO[str],
        stderr: IO[str],
        lines: LineSource,
        output: OutputDir | None = None,
    ):
        self.reactor = reactor
        self.stdout = stdout
        self.stderr = stderr
        self.lines = lines
        self.view = ConsoleView(stdout.write, stderr.write, output)
        self._told_eof = False

    def show(self, console: Sequence[ConsoleEntry]) -> None:
        self.view.show(console)
        self.stdout.flush()
        self.stderr.flush()

    def read_input(self, prompt: str, is_password: bool) -> Deferred[str | None]:
        d: Deferred[str | None]
        if is_password:
            d = Deferred()

            def read() -> None:
                text: str | None
                try:
                    text = getpass.getpass(prompt)
                except (EOFError, OSError):
                    text = None
                self.reactor.callFromThread(lambda: None if d.called else d.callback(text))

            threading.Thread(target=read, name="bai-ctl-password", daemon=True).start()
        else:
            if prompt:
                self.stdout.write(prompt)
                self.stdout.flush()
            d = self.lines.read_line()
        return d.addCallback(self._ended)

    def _ended(self, text: str | None) -> str:
        self.view.at_line_start = True  # the person pressed Enter (or the input ended)
        if text is None:
            if not self._told_eof:
                self._told_eof = True
                self.stderr.write("\nbai-agent-ctl: no more input; the run gets empty lines\n")
                self.stderr.flush()
            return ""
        return text


# -- ``bai-agent-ctl run`` ----------------------------------------------------------------------


def read_code(args: argparse.Namespace, stdin: IO[str] | None = None) -> tuple[str, str, dict[str, str]]:
    """The mode, code and execution options that ``run``'s arguments ask for."""
    if args.code is not None and args.file is not None:
        raise CtlError("give the code either with -c or as FILE, not both")
    if not args.batch and (args.build is not None or args.exec_command is not None):
        raise CtlError("--build and --exec are for batch mode: add --batch")
    if args.flush_timeout < 0:
        raise CtlError("--flush-timeout must not be negative")
    code: str | None = args.code
    if args.file == "-":
        code = (stdin or sys.stdin).read()
    elif args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as source:
                code = source.read()
        except FileNotFoundError as e:
            # Most often code meant for -c: bai-agent-ctl run AGENT KERNEL 'print(1)'.
            raise CtlError(
                f"cannot read {args.file}: no such file; to run code given on the command line, "
                f"use -c: -c {shlex.quote(args.file)}"
            ) from e
        except (OSError, UnicodeDecodeError) as e:
            raise CtlError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from e
    if args.batch:
        if code is None and args.exec_command is None:
            raise CtlError("batch mode needs --exec CMD, or code (-c CODE or FILE) to run as a shell script")
        options = {key: value for key, value in (("build", args.build), ("exec", args.exec_command)) if value}
        return "batch", code or "", options
    if code is None:
        raise CtlError("no code: give -c CODE, or FILE ('-' for standard input)")
    return "query", code, {}


@inlineCallbacks
def run_code(
    reactor: IReactorFromThreads,
    client: Any,
    args: argparse.Namespace,
    mode: str,
    code: str,
    options: dict[str, str],
    out: IO[str],
    err: IO[str],
    stdin: IO[str],
) -> Generator[Deferred[Any], Any, int]:
    """
    Run code and show it as it comes; the exit status. The first Ctrl-C interrupts the
    run (which then ends with 130, unless its code catches it); a second stops waiting.
    """
    if args.file == "-":
        # Standard input held the code: input() lines come from the terminal, if any.
        lines = LineSource(reactor, lambda: open("/dev/tty", encoding="utf-8", errors="replace"))
    else:
        lines = LineSource(reactor, lambda: stdin)
    output = OutputDir(getattr(args, "output_dir", None) or DEFAULT_OUTPUT_DIR)
    terminal = StreamTerminal(reactor, out, err, lines, output)
    kernel_run = KernelRun(client, args.kernel_id, terminal, args.flush_timeout)
    ended: Deferred[int | RunResult] = Deferred()
    presses: list[None] = []

    def on_interrupt() -> None:
        presses.append(None)
        if len(presses) == 1:
            err.write("\nbai-agent-ctl: interrupting the run (Ctrl-C again to stop waiting for it)\n")
            err.flush()
            kernel_run.interrupt().addErrback(ignore_not_running)
        elif not ended.called:
            err.write(f"\nbai-agent-ctl: stopped waiting; the run may still be active on kernel {args.kernel_id}\n")
            ended.callback(EXIT_INTERRUPTED)

    def relay(result: RunResult | Failure) -> None:
        # After a second Ctrl-C nobody waits for how the run ends any more.
        if not ended.called:
            ended.callback(result)  # a Failure goes down the errback chain

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Python calls the handler in the main thread, between two of the reactor's steps;
        # the work is handed to the reactor like any other event.
        reactor.callFromThread(on_interrupt)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        kernel_run.start(mode, code, options).addBoth(relay)
        try:
            result: int | RunResult = yield ended
        except errors.RunConflict as e:
            raise CtlError(f"kernel {args.kernel_id} is busy: {e}") from e
    finally:
        signal.signal(signal.SIGINT, previous)
    if isinstance(result, int):
        return result
    if result.status == "exec-timeout":
        err.write(f"bai-agent-ctl: the run exceeded the exec timeout of kernel {args.kernel_id}\n")
    return result.exit_status
