"""
Code on a kernel from a terminal: the parts of ``bai-agent-ctl run`` and the whole of
``bai-agent-ctl repl``.

``KernelRun`` drives one run (PROTOCOL.md section 2) on the reactor. It starts the run with
a short ``flush_timeout`` and collects it with ``continue`` calls, so that output shows as
it comes; it answers ``waiting-input`` from a *terminal*; ``interrupt()`` sends
``InterruptKernel``. A terminal is anything with ``show(console)`` and
``read_input(prompt, is_password) -> Deferred`` (a cancellable Deferred of the line).

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

``run`` keeps the reactor in the main thread (``react``): it reads input lines in daemon
threads (``LineSource``), and its SIGINT handler hands Ctrl-C to the reactor.
"""

import codeop
import collections
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
from typing import Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.python.failure import Failure

from bai_agent.protocol import errors

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
#: Seconds an ``Execute`` call waits before it returns the output so far: short, so that a
#: person sees output as it comes.
DEFAULT_FLUSH_TIMEOUT = 0.2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
DEFAULT_IMAGE = "bai-kernel/python:3.11"
#: Seconds to wait for completions before Tab gives up (the prompt must stay responsive).
COMPLETION_TIMEOUT = 2.0
#: Seconds the REPL waits for its kernel to be destroyed when it ends.
DESTROY_TIMEOUT = 30.0
CREATE_TIMEOUT = 300.0

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

    def __init__(self):
        self.lines = []

    @property
    def prompt(self) -> str:
        return CONTINUATION_PROMPT if self.lines else PROMPT

    def push(self, line: str) -> Optional[str]:
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

    def finish(self) -> Optional[str]:
        """At the end of input: what was typed of an unfinished block, or None."""
        source = "\n".join(self.lines)
        self.lines = []
        return source if source.strip() else None

    def reset(self):
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


def console_text(entry) -> tuple:
    """``(stream, text)`` for one ``[type, data]`` console entry: what a terminal shows."""
    kind, data = (list(entry) + [None, None])[:2]
    if kind in ("stdout", "stderr"):
        return kind, data if isinstance(data, str) else str(data)
    if kind == "media":
        mime, payload = (list(data) + ["?", ""])[:2] if isinstance(data, (list, tuple)) else ("?", data)
        return "stdout", f"[{mime} output, {len(payload or '')} characters not shown]\n"
    if kind == "html":
        return "stdout", f"[html output, {len(data or '')} characters not shown]\n"
    return "stdout", f"[{kind} output not shown]\n"


def render_console(console, write_stdout, write_stderr):
    """Write console entries in order, stdout entries to one writer, stderr to the other."""
    for entry in console or ():
        stream, text = console_text(entry)
        if text:
            (write_stderr if stream == "stderr" else write_stdout)(text)


def split_prompt(console) -> tuple:
    """
    ``(console, prompt)``: the end of the last stdout entry after its last newline is what
    ``input()`` printed as its prompt. Handing it to the line reader rather than printing
    it lets readline redraw the line properly (and getpass print it where it reads).
    """
    console = [list(entry) for entry in console or ()]
    if not console or console[-1][0] != "stdout" or not isinstance(console[-1][1], str):
        return console, ""
    text = console[-1][1]
    head, newline, prompt = text.rpartition("\n")
    if newline:
        console[-1][1] = head + newline
    else:
        console.pop()
    return console, prompt


@attr.s(frozen=True, auto_attribs=True)
class RunResult:
    """How a run ended: its last status (``finished`` or ``exec-timeout``) and exit code."""

    status: str
    exit_code: Optional[int] = None

    @property
    def exit_status(self) -> int:
        """The exit status for a command that ran it: 124 for a timeout, else the code."""
        if self.status == "exec-timeout":
            return EXIT_TIMEOUT
        if self.exit_code is None:
            return 0
        return self.exit_code if 0 <= self.exit_code <= 255 else 1


# -- one run, on the reactor ------------------------------------------------------------------


class KernelRun:
    """
    One run on a kernel, driven to its end: output goes to ``terminal.show`` answer by
    answer, ``waiting-input`` is answered with ``terminal.read_input``.

    :param client: an ``AgentClient`` (or anything with ``execute`` and ``interrupt_kernel``).
    """

    def __init__(self, client, kernel_id: str, terminal, flush_timeout: float = DEFAULT_FLUSH_TIMEOUT):
        self.client = client
        self.kernel_id = kernel_id
        self.terminal = terminal
        self.flush_timeout = flush_timeout
        self.run_id = None
        self._input = None  # the terminal's pending read, while the run waits for input

    @inlineCallbacks
    def start(self, mode: str, code: str = "", options: Optional[dict] = None):
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
    def _read_input(self, prompt, is_password):
        self._input = self.terminal.read_input(prompt, is_password)
        try:
            return (yield self._input)
        except CancelledError:
            return None  # interrupted while waiting for the line: collect how the run ends
        finally:
            self._input = None

    def interrupt(self):
        """
        Send ``InterruptKernel``. The run then ends (exit code 130) unless its code catches
        the ``KeyboardInterrupt``; a line the terminal was still asked for is not needed any
        more, so that read is cancelled once the kernel has the interrupt.
        """

        def sent(result):
            if self._input is not None:
                self._input.cancel()
            return result

        return self.client.interrupt_kernel(self.kernel_id).addCallback(sent)


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

    def __init__(self, reactor, open_file):
        self.reactor = reactor
        self.open_file = open_file
        self._file = None
        self._lines = collections.deque()
        self._waiting = None
        self._reading = False
        self._eof = False

    def read_line(self):
        if self._lines:
            return succeed(self._lines.popleft())
        if self._eof:
            return succeed(None)
        self._waiting = Deferred()
        if not self._reading:
            self._reading = True
            threading.Thread(target=self._read, name="bai-ctl-input", daemon=True).start()
        return self._waiting

    def _read(self):
        try:
            if self._file is None:
                self._file = self.open_file()
            line = self._file.readline()
        except (OSError, ValueError):
            line = ""
        self.reactor.callFromThread(self._arrived, line)

    def _arrived(self, line):
        self._reading = False
        if line:
            line = line[:-1] if line.endswith("\n") else line
        else:
            self._eof, line = True, None
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.callback(line)
        elif line is not None:
            self._lines.append(line)


class StreamTerminal:
    """
    What ``bai-agent-ctl run`` shows and reads: output to ``stdout``/``stderr`` as it comes,
    input lines from ``lines`` (a ``LineSource``), passwords with ``getpass`` (no echo) in a
    daemon thread. When the input has ended, ``input()`` gets an empty line.
    """

    def __init__(self, reactor, stdout, stderr, lines):
        self.reactor = reactor
        self.stdout = stdout
        self.stderr = stderr
        self.lines = lines
        self._told_eof = False

    def show(self, console):
        render_console(console, self.stdout.write, self.stderr.write)
        self.stdout.flush()
        self.stderr.flush()

    def read_input(self, prompt, is_password):
        if is_password:
            d = Deferred()

            def read():
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

    def _ended(self, text):
        if text is None:
            if not self._told_eof:
                self._told_eof = True
                self.stderr.write("\nbai-agent-ctl: no more input; the run gets empty lines\n")
                self.stderr.flush()
            return ""
        return text


# -- the REPL: terminal in the main thread, reactor in another ---------------------------------


class ReplSession:
    """The reactor's side of a REPL: its kernel and its connection, and the current run."""

    def __init__(self, reactor, connect, client, kernel_id, flush_timeout=DEFAULT_FLUSH_TIMEOUT):
        self.reactor = reactor
        self.connect = connect
        self.client = client
        self.kernel_id = kernel_id
        self.flush_timeout = flush_timeout
        self.current = None

    @classmethod
    @inlineCallbacks
    def open(cls, reactor, connect, kernel_id, image, resources, flush_timeout=DEFAULT_FLUSH_TIMEOUT):
        """
        Connect (``connect(reactor)`` fires with an ``AgentClient``) and create the kernel.
        A creation that fails for any reason but ``KERNEL_EXISTS`` (someone else's kernel)
        is followed by a destroy, in case the agent made part of it before the failure.
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

    def run(self, code, terminal):
        self.current = KernelRun(self.client, self.kernel_id, terminal, self.flush_timeout)
        return self.current.start("query", code)

    def interrupt(self):
        """Interrupt the current run; nothing running is no error."""
        if self.current is None:
            return succeed(None)
        return self.current.interrupt().addErrback(lambda failure: failure.trap(errors.KernelNotRunning))

    def completions(self, text):
        d = self.client.get_completions(self.kernel_id, text)
        d.addTimeout(COMPLETION_TIMEOUT, self.reactor)
        return d

    @inlineCallbacks
    def close(self, timeout=DESTROY_TIMEOUT):
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

    def __init__(self, events: queue.Queue):
        self.events = events

    def show(self, console):
        if console:
            self.events.put(("output", console))

    def read_input(self, prompt, is_password):
        d = Deferred()
        self.events.put(("input", prompt, is_password, d))
        return d


def _answer(d, text):
    if not d.called:  # a read cancelled by an interrupt
        d.callback(text)


class ReactorThread:
    """The reactor running in a daemon thread; calls into it from the main thread."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.thread = None

    def start(self, timeout=10.0):
        running = threading.Event()

        def run():
            # Signals must reach the main thread, the only one where Python handles them.
            signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINAL_SIGNALS)
            self.reactor.callWhenRunning(running.set)
            self.reactor.run(installSignalHandlers=False)

        self.thread = threading.Thread(target=run, name="bai-reactor", daemon=True)
        self.thread.start()
        if not running.wait(timeout):
            raise RuntimeError("the reactor did not start")

    def submit(self, function, *args, **kwargs) -> concurrent.futures.Future:
        """Call ``function`` in the reactor thread; a future of its (Deferred's) result."""
        future = concurrent.futures.Future()

        def settle(result):
            if isinstance(result, Failure):
                future.set_exception(result.value)
            else:
                future.set_result(result)

        self.reactor.callFromThread(lambda: maybeDeferred(function, *args, **kwargs).addBoth(settle))
        return future

    def call_soon(self, function, *args):
        self.reactor.callFromThread(function, *args)

    def stop(self, timeout=10.0):
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

    def __init__(self, stdin, stdout, stderr, interactive):
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.interactive = interactive
        self.at_line_start = True

    def read_line(self, prompt, fresh_line=True):
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

    def read_password(self, prompt):
        if self.interactive:
            self.stdout.flush()
            try:
                return getpass.getpass(prompt)
            finally:
                self.at_line_start = True
        return self.read_line(prompt, fresh_line=False)

    def write_out(self, text):
        self._write(self.stdout, text)

    def write_err(self, text):
        self._write(self.stderr, text)

    def _write(self, stream, text):
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
    """

    def __init__(self, bridge, session, io):
        self.bridge = bridge
        self.session = session
        self.io = io
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

    def run(self, source):
        """Run one block: show its output as it comes, answer its input, pass Ctrl-C on."""
        events = queue.Queue()
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
            return future.result()
        except (errors.KernelNotRunning, errors.KernelNotFound) as e:
            raise SessionEnded(f"the kernel is not running any more: {e}")
        except errors.AgentError as e:
            self.io.write_err(f"bai-agent-ctl: {type(e).__name__}: {e}\n")
        except Exception as e:
            raise SessionEnded(f"lost the agent: {type(e).__name__}: {e}")

    def _handle(self, event):
        if event[0] == "output":
            render_console(event[1], self.io.write_out, self.io.write_err)
        elif event[0] == "input":
            _, prompt, is_password, d = event
            try:
                if is_password:
                    text = self.io.read_password(prompt)
                else:
                    text = self.io.read_line(prompt, fresh_line=False)
            except EOFError:
                text = ""
            self.bridge.call_soon(_answer, d, text)

    def _drain(self, events):
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "output":
                self._handle(event)

    def complete(self, line):
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

    def __init__(self, readline, complete):
        self.readline = readline
        self.complete = complete
        self.matches = []

    def __call__(self, text, state):
        if state == 0:
            line = self.readline.get_line_buffer()[: self.readline.get_endidx()]
            if not line.strip():
                self.matches = ["    "]
            else:
                self.matches = [item for item in self.complete(line) if item.startswith(text)]
        return self.matches[state] if state < len(self.matches) else None


def _enable_readline(console):
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

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            raise SystemExit(128 + signum)


def _wait_for_session(future, io):
    """The session being opened; Ctrl-C meanwhile ends the REPL once it exists (to destroy it)."""
    cancelled = False
    while True:
        try:
            return future.result(), cancelled
        except KeyboardInterrupt:
            if not cancelled:
                io.write_err("\nbai-agent-ctl: cancelled; the kernel is destroyed once it is created\n")
            cancelled = True


def repl_resources(args) -> dict:
    """The ``resources`` of ``--cpu`` and ``--mem`` (of ``repl`` and ``create``)."""
    resources = {}
    if getattr(args, "cpu", None) is not None:
        resources["cpu"] = args.cpu
    if getattr(args, "mem", None) is not None:
        resources["mem"] = int(args.mem) if str(args.mem).isdigit() else args.mem
    return resources


def main(reactor, args, connect, user_errors=(), stdin=None, stdout=None, stderr=None) -> int:
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
    opening = session = None
    status = 0
    try:
        bridge.start()
        opening = bridge.submit(
            ReplSession.open,
            reactor,
            connect,
            kernel_id,
            image,
            repl_resources(args),
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
        console = Console(bridge, session, io)
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


def _destroy(bridge, session, io):
    try:
        bridge.submit(session.close).result(DESTROY_TIMEOUT + 15)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        io.write_err(
            f"bai-agent-ctl: could not destroy kernel {session.kernel_id} ({reason}); "
            f"destroy it with: bai-agent-ctl destroy AGENT {session.kernel_id}\n"
        )
