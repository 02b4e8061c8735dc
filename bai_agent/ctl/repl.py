"""
``bai-agent-ctl repl``: an interactive Python prompt on a new kernel.

The REPL is for people at a terminal: it reads lines with ``input()`` (so readline gives it
line editing, history and Tab completion) and gets Ctrl-C as ``KeyboardInterrupt``. CPython
runs signal handlers, and so can interrupt a blocked ``input()``, only in the main thread: a
line read by a worker thread cannot be abandoned when Ctrl-C comes at the prompt, and
readline would keep the half-typed line. So the REPL puts the terminal in the main thread
and the reactor in a thread of its own (``ReactorThread``, with the signals blocked there so
that the kernel delivers them to the main thread). All AMP work runs in the reactor thread;
the main thread hands it calls (``ReactorThread.submit``) and gets what a run shows and asks
through a queue (``QueueTerminal``). The reactor never waits for the terminal, and every
wait of the main thread can be interrupted by a signal.

Each block typed is one run, driven by ``bai_agent.ctl.run.KernelRun``.
"""

from __future__ import annotations

import argparse
import codeop
import concurrent.futures
import getpass
import io
import queue
import re
import secrets
import signal
import sys
import threading
import tokenize
import warnings
from collections.abc import Callable, Generator, Sequence
from types import FrameType
from typing import IO, Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.python.failure import Failure

from bai_agent.ctl.commands import kernel_resources
from bai_agent.ctl.output import DEFAULT_OUTPUT_DIR, ConsoleView, OutputDir
from bai_agent.ctl.run import (
    DEFAULT_FLUSH_TIMEOUT,
    EXIT_INTERRUPTED,
    ConsoleEntry,
    KernelRun,
    RunResult,
    ignore_not_running,
)
from bai_agent.protocol import errors

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
DEFAULT_IMAGE = "bai-kernel/python:3.11"
#: Seconds to wait for completions before Tab gives up (the prompt must stay responsive).
COMPLETION_TIMEOUT = 2.0
#: Seconds the REPL waits for its kernel to be destroyed when it ends.
DESTROY_TIMEOUT = 30.0
CREATE_TIMEOUT = 300.0

#: ``connect(reactor)`` fires with an authenticated ``AgentClient``.
Connect = Callable[[Any], "Deferred[Any]"]

_EXIT_COMMAND = re.compile(r"\s*(exit|quit)\s*(\(\s*\))?\s*")
# What readline cuts words at, without ".": the kernel completes whole dotted names.
_COMPLETER_DELIMS = " \t\n`~!@#$%^&*()-=+[{]}\\|;:'\",<>/?"


# -- pure parts -------------------------------------------------------------------------------


class CodeBlock:
    """
    Lines typed at the prompt, gathered into blocks the way the Python REPL does: a line
    that completes a statement is a block by itself; a compound statement goes on until an
    empty line; an unfinished bracket or string goes on until it is closed. A block that
    cannot compile is complete too (the kernel reports the error).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    @property
    def prompt(self) -> str:
        return CONTINUATION_PROMPT if self.lines else PROMPT

    def push(self, line: str) -> str | None:
        """Add one line; the block's source once it is complete, else None."""
        if not self.lines and not line.strip():
            return None
        self.lines.append(line)
        source = "\n".join(self.lines)
        if needs_more(source) and (line.strip() or is_open(source)):
            # An empty line ends a block, as in the Python REPL ("def f():" and an empty
            # line is an IndentationError), but not inside brackets or a string.
            return None
        self.lines = []
        return source

    def finish(self) -> str | None:
        """At the end of input: what was typed of an unfinished block, or None."""
        source = "\n".join(self.lines)
        self.lines = []
        return source if source.strip() else None

    def reset(self) -> None:
        self.lines = []


def needs_more(source: str) -> bool:
    """Whether ``source`` is the start of a statement that more lines would complete."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return codeop.compile_command(source, "<input>", "single") is None
        except (SyntaxError, OverflowError, ValueError):
            return False


def is_open(source: str) -> bool:
    """Whether ``source`` ends inside brackets, a triple-quoted string or a continued line."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(source + "\n").readline):
            pass
    except tokenize.TokenError:
        return True
    except SyntaxError:
        return False
    return False


def is_exit_command(source: str) -> bool:
    """``exit()``, ``quit()`` (and bare ``exit``/``quit``): the user leaves the REPL."""
    return _EXIT_COMMAND.fullmatch(source) is not None


# -- the REPL: terminal in the main thread, reactor in another ---------------------------------


class ReplSession:
    """The reactor's side of a REPL: its kernel and its connection, and the current run."""

    def __init__(
        self, reactor: Any, connect: Connect, client: Any, kernel_id: str, flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    ):
        self.reactor = reactor
        self.connect = connect
        self.client = client
        self.kernel_id = kernel_id
        self.flush_timeout = flush_timeout
        self.current: KernelRun | None = None

    @classmethod
    @inlineCallbacks
    def open(
        cls,
        reactor: Any,
        connect: Connect,
        kernel_id: str,
        image: str,
        resources: dict[str, Any],
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
    ) -> Generator[Deferred[Any], Any, ReplSession]:
        """
        Connect (``connect(reactor)`` fires with an ``AgentClient``) and create the kernel.
        A creation that fails for any reason but ``KERNEL_EXISTS`` (someone else's kernel)
        is followed by a destroy, in case the agent made part of it before the failure.
        ``reactor``: ``IReactorTime``, and what ``connect`` needs.
        """
        client = yield connect(reactor)
        session = cls(reactor, connect, client, kernel_id, flush_timeout)
        try:
            d = client.create_kernel(kernel_id, image, resources)
            d.addTimeout(CREATE_TIMEOUT, reactor)
            yield d
        except errors.KernelExists:
            client.close()
            raise
        except BaseException:
            yield session.close().addErrback(lambda _: None)
            raise
        return session

    def run(self, code: str, terminal: QueueTerminal) -> Deferred[RunResult]:
        self.current = KernelRun(self.client, self.kernel_id, terminal, self.flush_timeout)
        return self.current.start("query", code)

    def interrupt(self) -> Deferred[Any]:
        """Interrupt the current run; nothing running is no error."""
        if self.current is None:
            return succeed(None)
        return self.current.interrupt().addErrback(ignore_not_running)

    def completions(self, text: str) -> Deferred[list[str]]:
        d: Deferred[list[str]] = self.client.get_completions(self.kernel_id, text)
        d.addTimeout(COMPLETION_TIMEOUT, self.reactor)
        return d

    @inlineCallbacks
    def close(self, timeout: float = DESTROY_TIMEOUT) -> Generator[Deferred[Any], Any, None]:
        """Destroy the kernel (over a new connection if this one was lost), and disconnect."""
        clients = [self.client]
        try:
            client = self.client
            if client.disconnected.called:
                client = yield self.connect(self.reactor)
                clients.append(client)
            d = client.destroy_kernel(self.kernel_id)
            d.addTimeout(timeout, self.reactor)
            try:
                yield d
            except errors.KernelNotFound:
                pass
        finally:
            for client in clients:
                client.close()


class QueueTerminal:
    """A terminal for ``KernelRun`` in the reactor thread: it posts to the main thread."""

    def __init__(self, events: queue.Queue[tuple[Any, ...]]):
        self.events = events

    def show(self, console: Sequence[ConsoleEntry]) -> None:
        if console:
            self.events.put(("output", console))

    def read_input(self, prompt: str, is_password: bool) -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()
        self.events.put(("input", prompt, is_password, d))
        return d


def _answer(d: Deferred[str | None], text: str) -> None:
    if not d.called:  # a read cancelled by an interrupt
        d.callback(text)


class ReactorThread:
    """
    The reactor running in a daemon thread; calls into it from the main thread.

    :param reactor: ``IReactorCore`` and ``IReactorFromThreads``, not running yet.
    """

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        running = threading.Event()

        def run() -> None:
            # Signals must reach the main thread, the only one where Python handles them.
            signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINAL_SIGNALS)
            self.reactor.callWhenRunning(running.set)
            self.reactor.run(installSignalHandlers=False)

        self.thread = threading.Thread(target=run, name="bai-reactor", daemon=True)
        self.thread.start()
        if not running.wait(timeout):
            raise RuntimeError("the reactor did not start")

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Call ``function`` in the reactor thread; a future of its (Deferred's) result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle(result: object) -> None:
            if isinstance(result, Failure):
                future.set_exception(result.value)
            else:
                future.set_result(result)

        self.reactor.callFromThread(lambda: maybeDeferred(function, *args, **kwargs).addBoth(settle))
        return future

    def call_soon(self, function: Callable[..., object], *args: Any) -> None:
        self.reactor.callFromThread(function, *args)

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is None or not self.thread.is_alive():
            return
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(timeout)


_TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class SessionEnded(Exception):
    """The kernel or the connection to its agent is gone: the REPL cannot go on."""


class TerminalIO:
    """
    The main thread's terminal: lines with ``input()`` (readline when ``interactive``),
    passwords with ``getpass``, output to ``stdout``/``stderr``. ``interactive`` (standard
    input is a terminal) decides whether prompts and the banner are shown.
    """

    def __init__(self, stdin: IO[str], stdout: IO[str], stderr: IO[str], interactive: bool):
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.interactive = interactive
        self.at_line_start = True

    def read_line(self, prompt: str, fresh_line: bool = True) -> str:
        """A line without its newline; ``EOFError`` at the end. ``fresh_line``: the prompt
        starts a line of its own (not so for the prompt of ``input()`` in the kernel)."""
        if self.interactive:
            if fresh_line and not self.at_line_start:
                self.stdout.write("\n")
            self.stdout.flush()
            self.stderr.flush()
            try:
                return input(prompt)
            finally:
                self.at_line_start = True
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line[:-1] if line.endswith("\n") else line

    def read_password(self, prompt: str) -> str:
        if self.interactive:
            self.stdout.flush()
            try:
                return getpass.getpass(prompt)
            finally:
                self.at_line_start = True
        return self.read_line(prompt, fresh_line=False)

    def write_out(self, text: str) -> None:
        self._write(self.stdout, text)

    def write_err(self, text: str) -> None:
        self._write(self.stderr, text)

    def _write(self, stream: IO[str], text: str) -> None:
        if text:
            stream.write(text)
            stream.flush()
            self.at_line_start = text.endswith("\n")


class Console:
    """
    The REPL's prompt loop, in the main thread.

    :param bridge: a ``ReactorThread`` (``submit``, ``call_soon``).
    :param session: a ``ReplSession``; only touched through ``bridge``.
    :param io: a ``TerminalIO``.
    :param output: where pictures are saved (``bai_agent.ctl.output``).
    """

    def __init__(self, bridge: ReactorThread, session: ReplSession, io: TerminalIO, output: OutputDir | None = None):
        self.bridge = bridge
        self.session = session
        self.io = io
        self.view = ConsoleView(io.write_out, io.write_err, output)
        self.at_prompt = False

    def loop(self) -> int:
        """Read, run, show, until the end of input or ``exit()``; the exit status."""
        block = CodeBlock()
        while True:
            try:
                self.at_prompt = True
                try:
                    line = self.io.read_line(block.prompt if self.io.interactive else "")
                finally:
                    self.at_prompt = False
            except KeyboardInterrupt:
                self.io.write_err("\nKeyboardInterrupt\n")
                block.reset()
                continue
            except EOFError:
                if self.io.interactive:
                    self.io.write_out("\n")
                source = block.finish()
                if source is not None and not is_exit_command(source):
                    self.run(source)
                return 0
            source = block.push(line)
            if source is None:
                continue
            if is_exit_command(source):
                return 0
            self.run(source)

    def run(self, source: str) -> RunResult | None:
        """Run one block: show its output as it comes, answer its input, pass Ctrl-C on."""
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.view.at_line_start = True  # the block was typed at a prompt of its own
        future = self.bridge.submit(self.session.run, source, QueueTerminal(events))
        future.add_done_callback(lambda _: events.put(("done",)))
        while True:
            try:
                event = events.get()
                if event[0] == "done":
                    break
                self._handle(event)
            except KeyboardInterrupt:
                self.bridge.call_soon(self.session.interrupt)
                if future.done():
                    self._drain(events)
                    break
        try:
            result: RunResult = future.result()
        except (errors.KernelNotRunning, errors.KernelNotFound) as e:
            raise SessionEnded(f"the kernel is not running any more: {e}") from e
        except errors.AgentError as e:
            self.io.write_err(f"bai-agent-ctl: {type(e).__name__}: {e}\n")
            return None
        except Exception as e:
            raise SessionEnded(f"lost the agent: {type(e).__name__}: {e}") from e
        return result

    def _handle(self, event: tuple[Any, ...]) -> None:
        if event[0] == "output":
            self.view.show(event[1])
        elif event[0] == "input":
            _, prompt, is_password, d = event
            try:
                if is_password:
                    text = self.io.read_password(prompt)
                else:
                    text = self.io.read_line(prompt, fresh_line=False)
            except EOFError:
                text = ""
            self.view.at_line_start = True
            self.bridge.call_soon(_answer, d, text)

    def _drain(self, events: queue.Queue[tuple[Any, ...]]) -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "output":
                self._handle(event)

    def complete(self, line: str) -> list[str]:
        """Completions of the code before the cursor, or none when the kernel is slow."""
        if not self.at_prompt:
            return []
        future = self.bridge.submit(self.session.completions, line)
        try:
            return list(future.result(COMPLETION_TIMEOUT + 1))
        except Exception:
            return []


class Completer:
    """A readline completer: whitespace completes to an indent; names through the kernel."""

    def __init__(self, readline: Any, complete: Callable[[str], list[str]]):
        self.readline = readline
        self.complete = complete
        self.matches: list[str] = []

    def __call__(self, text: str, state: int) -> str | None:
        if state == 0:
            line = self.readline.get_line_buffer()[: self.readline.get_endidx()]
            if not line.strip():
                self.matches = ["    "]
            else:
                self.matches = [item for item in self.complete(line) if item.startswith(text)]
        return self.matches[state] if state < len(self.matches) else None


def _enable_readline(console: Console) -> None:
    try:
        import readline
    except ImportError:
        return
    readline.set_completer_delims(_COMPLETER_DELIMS)
    readline.set_completer(Completer(readline, console.complete))
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")


class _Termination:
    """SIGTERM/SIGHUP handler: end the REPL through ``finally`` blocks, once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            raise SystemExit(128 + signum)


def _wait_for_session(future: concurrent.futures.Future[ReplSession], io: TerminalIO) -> tuple[ReplSession, bool]:
    """The session being opened; Ctrl-C meanwhile ends the REPL once it exists (to destroy it)."""
    cancelled = False
    while True:
        try:
            return future.result(), cancelled
        except KeyboardInterrupt:
            if not cancelled:
                io.write_err("\nbai-agent-ctl: cancelled; the kernel is destroyed once it is created\n")
            cancelled = True


def main(
    reactor: Any,
    args: argparse.Namespace,
    connect: Connect,
    user_errors: tuple[type[BaseException], ...] = (),
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    ``bai-agent-ctl repl``: the exit status. ``reactor`` is not running yet: it is run in
    a thread of its own here. ``connect(reactor)`` fires with an authenticated
    ``AgentClient``; exceptions in ``user_errors`` are reported in one line. The kernel is
    destroyed however the REPL ends: ``exit()``, end of input, an error, SIGTERM or SIGHUP.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    io = TerminalIO(stdin, stdout, stderr, interactive=stdin.isatty())
    kernel_id = args.kernel_id or f"repl-{secrets.token_hex(4)}"
    image = args.image or DEFAULT_IMAGE
    termination = _Termination()
    previous = {signum: signal.signal(signum, termination) for signum in (signal.SIGTERM, signal.SIGHUP)}
    bridge = ReactorThread(reactor)
    opening: concurrent.futures.Future[ReplSession] | None = None
    session: ReplSession | None = None
    status = 0
    try:
        bridge.start()
        opening = bridge.submit(
            ReplSession.open,
            reactor,
            connect,
            kernel_id,
            image,
            kernel_resources(args),
            flush_timeout=getattr(args, "flush_timeout", None) or DEFAULT_FLUSH_TIMEOUT,
        )
        try:
            session, cancelled = _wait_for_session(opening, io)
        except user_errors as e:
            io.write_err(f"bai-agent-ctl: {e}\n")
            return 1
        except errors.AgentError as e:
            io.write_err(f"bai-agent-ctl: cannot create kernel {kernel_id}: {type(e).__name__}: {e}\n")
            return 1
        if cancelled:
            return EXIT_INTERRUPTED
        console = Console(bridge, session, io, OutputDir(getattr(args, "output_dir", None) or DEFAULT_OUTPUT_DIR))
        if io.interactive:
            _enable_readline(console)
            io.write_err(
                f"Python kernel {kernel_id} ({image}) on {args.agent}. Ctrl-D or exit() leaves and destroys it.\n"
            )
        try:
            status = console.loop()
        except SessionEnded as e:
            io.write_err(f"bai-agent-ctl: {e}\n")
            status = 1
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        io.write_err(f"bai-agent-ctl: {type(e).__name__}: {e}\n")
        return 1
    finally:
        # Nothing may stop the clean-up half way: a second signal is ignored, and the
        # destroy itself has a time limit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if session is None and opening is not None:
                # Ended while the kernel was being created: wait for it, to destroy it.
                try:
                    session = opening.result(CREATE_TIMEOUT + 15)
                except Exception:
                    pass  # a failed creation cleans up after itself
            if session is not None:
                _destroy(bridge, session, io)
        finally:
            bridge.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _destroy(bridge: ReactorThread, session: ReplSession, io: TerminalIO) -> None:
    try:
        bridge.submit(session.close).result(DESTROY_TIMEOUT + 15)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        io.write_err(
            f"bai-agent-ctl: could not destroy kernel {session.kernel_id} ({reason}); "
            f"destroy it with: bai-agent-ctl destroy AGENT {session.kernel_id}\n"
        )
