"""
bai-runner: the main process of a kernel container, started through ``main.py``:

    /usr/bin/python3 -I -u /opt/bai/runner/main.py --socket /run/bai/runner.sock \\
        --uid 1000 --gid 1000 --home /home/work \\
        --runtime-type python --runtime-path /usr/bin/python3

It listens on a UNIX socket (mode 0600, in a 0700 directory the user cannot enter) for
the agent, one connection at a time: a new connection replaces the old one, and runs go
on across the change. User code always runs as ``--uid``/``--gid``, in its own session.

This module is the ``Runner``: the poll loop, the interpreter and the runs, the children
it reaps. Beside it: ``options.py`` (the command line), ``messages.py`` (the agent's
messages, checked and answered), ``connection.py`` (the agent's socket and the outbox),
``interpreter.py`` (the persistent interpreter, ``query.py``), ``batch.py`` (batch runs),
``procs.py`` (spawning user processes), ``services.py`` (services and their relay).

Wire protocol (version 1). Frames: 4-byte big-endian length + one UTF-8 JSON object with a
string ``type``; at most 8 MiB; a bad frame closes that connection.

runner -> agent
  hello           {"protocol": 1, "runner_version", "python", "pid", "runtime_type",
                   "features": [...], "active_run": run_id or null}   first, on accept
  pong            {"id"}                                     answer to ping, at once
  output          {"run_id", "stream": "stdout"|"stderr", "data"}   data <= 64 Ki chars
  rich            {"run_id", "item": ["html", TEXT] | ["media", [MIME, DATA]]}   query
                  only: one rich output item (MIME image/png with base64 DATA, or
                  image/svg+xml), in order with the output messages around it
  waiting-input   {"run_id", "prompt", "is_password"}        the run blocks until input
  build-finished  {"run_id", "exit_code", ["skipped": true]}          batch only
  finished        {"run_id", "exit_code"}                    last message of every run
  interrupt-result {"ok", ["id"]}
  completions     {"id", "items": [str, ...]}
  service-started {"name"}                   the service listens; its socket relays to it
  service-failed  {"name", "reason", "output"}  it exited, or did not listen in time
  service-exited  {"name", "exit_code", "output"}   a started service ended (or was stopped)
  services        {["id"], "services": [{"name", "pid", "status", "port", "socket",
                   "connections", "exit_code"}, ...]}        answer to list-services
  error           {"code", "message", ["run_id"], ["name"]}

agent -> runner
  hello      {"protocol": 1}            first; another version -> error PROTOCOL_MISMATCH
  ping       {"id"}
  execute    {"run_id", "mode": "query"|"batch", "code", ["options": {"build", "exec"}]}
  input      {"run_id", "data"}
  interrupt  {["id"]}
  complete   {"id", "text", ["options"]}
  cancel     {"run_id"}
  start-service {"name", "argv": [str, ...], "env": {str: str}, "port", "socket",
                 ["timeout": seconds]}
  stop-service  {"name"}
  list-services {["id"]}
  claim      {"environ": {str: str}}   a warm (pool) runner becomes a kernel's: user
             processes get this environment from now on (the idle interpreter is replaced)

Exit codes: 0 ok; 1 uncaught exception (query); 130 interrupted (KeyboardInterrupt, or a
batch command killed by SIGINT); 137 cancelled; 127 batch build failed or a command could
not be started; 128+N the interpreter or command was killed by signal N; otherwise the
process's own exit code (``SystemExit`` in query mode).

Error codes: PROTOCOL_MISMATCH, PROTOCOL_ERROR (first message not hello), BAD_REQUEST,
UNKNOWN_MESSAGE, RUN_CONFLICT, NOT_SUPPORTED (query on a shell runtime),
NOT_WAITING_INPUT, NO_SUCH_RUN, NO_SUCH_SERVICE (stop-service of a name never started),
SERVICE_CONFLICT (start-service of a service still stopping). Service errors carry
``name``; a refused start-service is BAD_REQUEST with a message "start-service: why".

Semantics worth knowing:
- query: globals live on between runs; a last expression statement is shown like the REPL
  (repr on stdout, and ``_``), or as a ``rich`` item when the value has a rich
  representation (``_repr_html_``, ``_repr_png_``, ``_repr_svg_``, a matplotlib figure);
  ``display(obj)`` is a builtin; ``plt.show()`` and figures left open at the end of a
  run give PNG items (see ``display.py``); stdout and stderr of Python code keep their relative order;
  output written straight to fds 1 and 2 (subprocesses, os.write) arrives too, in order
  with the rest only as far as timing allows. Output of threads between runs is held and
  comes with the next run. ``input()``, ``sys.stdin`` and ``getpass.getpass()`` ask with
  ``waiting-input`` (the prompt is in the message, not in the output).
- interrupt: SIGINT to the run's process group; ``ok`` is false only when no run is
  active. An interrupt that comes before the interpreter has begun the code is held
  until it does. A query run then ends with ``KeyboardInterrupt`` and exit code 130.
- cancel: SIGKILL to the run's process group; ``finished`` with 137. A query run's
  interpreter is replaced by a fresh one (globals are lost), as after a crash.
- complete: ``items`` complete the dotted name at the end of ``text`` from the live
  namespace (``"print(os.pa"`` -> ``["os.pardir", "os.path", ...]``); empty at once while
  a run is active.
- a new connection replaces the old one; its hello names the active run, and a pending
  ``waiting-input`` is sent again. Frames already written to the old socket are gone.
- services (feature ``services``, see ``services.py``): ``start-service`` checks its
  message (name ``[a-z][a-z0-9-]{0,31}``; ``port`` 1-65535; ``timeout`` in (0, 120],
  default 30; ``socket`` an absolute normal path inside the runner's state directory,
  in a directory of the runner's that no one else may write, not the runner's own
  socket, not an existing non-socket; a PATH search for a bare ``argv[0]``), then
  starts ``argv`` as the user, in the home, in a session of its own, with the kernel's
  environment plus ``env``, stdout and stderr into a 64 KiB tail (``output``). It probes
  ``127.0.0.1:port`` every 100 ms; once something accepts there it listens on
  ``socket`` (0600) and answers ``service-started``; if the program exits first or the
  timeout passes (the group is then SIGKILLed), ``service-failed``. Every connection to
  ``socket`` is relayed to a new TCP connection to the port (256 KiB buffered per
  direction, half-closes passed on). ``start-service`` of a running service answers
  ``service-started`` again (one starting answers once it is up; one that failed or
  exited is started afresh). ``stop-service``: SIGTERM to the group, SIGKILL 5 s later,
  then ``service-exited`` (of a starting one too; of one that exited or failed, at once:
  its last exit code, null if it never ran, and output tail). At most 256 connections
  per service are relayed at once; more wait in the socket's backlog. A started
  service that ends sends ``service-exited``; its socket and connections are closed and
  the socket removed. Statuses: starting, running, stopping, exited, failed. These
  messages go through the outbox (a new connection gets them); ``services`` and errors
  are control answers. All services are killed when the runner stops.

Output flow control: messages for the agent wait in one outbox. While it holds
``--outbox-limit`` bytes (4 MiB) or more, the runner stops reading user output, so user
code blocks on write instead of the runner growing; with no agent connected the outbox
keeps filling up to the limit, and a new connection gets it from the first message not
yet completely written to the old one. Control answers (pong, completions, ...) bypass
the outbox and go first.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import batch  # noqa: E402
import framing  # noqa: E402
import interpreter  # noqa: E402
import jsoncodec  # noqa: E402
import procs  # noqa: E402
import services  # noqa: E402
from connection import AgentConnection, Outbox  # noqa: E402
from messages import PROTOCOL, RUNNER_VERSION, AgentMessages  # noqa: E402
from options import USAGE, UsageError, parse_args  # noqa: E402

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any, Callable

    from options import Options

#: poll() timeout: a safety net for reaping; signals wake the loop anyway.
POLL_MS = 2000

EXIT_INTERRUPTED = 130
EXIT_CANCELLED = 137
EXIT_NOT_STARTED = 127


def log(message: str) -> None:
    """The runner's own diagnostics go to its stderr: the container log."""
    try:
        sys.stderr.write(f"bai-runner: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


class QueryRun:
    """A run in the persistent interpreter."""

    mode = "query"

    def __init__(self, runner: Runner, run_id: str, interp: Any) -> None:
        self.runner = runner
        self.run_id = run_id
        self.interp = interp
        self.cancelled = False
        self.waiting: dict | None = None  # {"request", "prompt", "is_password", "delivered"}
        self.started = False
        self.interrupt_pending = False

    @property
    def pipes(self) -> tuple:
        return self.interp.pipes

    def interrupt(self) -> bool:
        if self.started:
            return self.interp.interrupt()
        # The interpreter has not begun the code yet (still starting, or reading the
        # request): a SIGINT now would be ignored, so it is sent once the run starts.
        self.interrupt_pending = True
        return True

    def on_started(self) -> None:
        self.started = True
        if self.interrupt_pending:
            self.interrupt_pending = False
            self.interp.interrupt()

    def cancel(self) -> None:
        self.cancelled = True
        self.interp.kill()

    def shutdown(self) -> None:
        self.interp.kill()


class Runner:
    def __init__(self, options: Options) -> None:
        self.options = options
        # The runner's own environment is the container's (the image's, and HOME): nothing
        # a manager chose. The kernel's environment is for the user's processes only.
        self.base_environ = dict(os.environ)
        self.base_environ["HOME"] = options.home
        try:
            import pwd

            name = pwd.getpwuid(options.uid).pw_name
            self.base_environ.setdefault("USER", name)
            self.base_environ.setdefault("LOGNAME", name)
        except (ImportError, KeyError):
            pass
        environ = self.user_environ(read_user_environ(getattr(options, "environ_file", "")))
        self.identity = procs.Identity(options.uid, options.gid, options.home, environ)
        self.supports_query = options.runtime_type == "python"
        self.outbox = Outbox(options.outbox_limit)
        self._messages = AgentMessages(self)
        self.services = services.Services(self)
        # (None until there is one; the sibling modules are not visible to mypy anyway)
        self.conn: Any = None  # the AgentConnection
        self.run: Any = None  # the QueryRun or batch.BatchRun under way
        self.last_run_id = None
        self.interp: Any = None  # the interpreter.InterpreterProcess
        self._interp_error: str | None = None
        self._children: dict = {}  # pid -> callback(status)
        self._completions: dict = {}  # our request id -> (interpreter, connection, the agent's id)
        self._next_completion = 0
        self._seq = 0
        self._stopping = False
        self.listener: Any = None  # the listening socket, once listen() has made it
        self._wakeup_r: Any = None  # the signal wake-up pipe, once install_signals() has made it
        self._wakeup_w: Any = None

    # -- set-up and the loop -------------------------------------------------------

    def listen(self) -> None:
        path = self.options.socket
        # Bind and listen under a temporary name, then rename: the socket appears at
        # its path only once it accepts connections (and replaces a stale one).
        temporary = f"{path}.{os.getpid()}.tmp"
        for stale in (temporary, path):
            try:
                if stat.S_ISSOCK(os.lstat(stale).st_mode):
                    os.unlink(stale)
            except FileNotFoundError:
                pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(temporary)
        finally:
            os.umask(old_umask)
        os.chmod(temporary, 0o600)
        listener.listen(8)
        listener.setblocking(False)
        os.rename(temporary, path)
        self.listener = listener

    def install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)

        def stop(signum, frame):
            self._stopping = True

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def serve(self) -> None:
        self.identity.check()
        self.listen()
        self.install_signals()
        if self.supports_query:
            self.ensure_interpreter()
        log(f"listening on {self.options.socket} (pid {os.getpid()})")
        try:
            while not self._stopping:
                self._iterate()
        finally:
            self.shutdown()

    def _interest(self):
        """fd -> (owner, on_read or None, on_write or None), from the state right now."""
        interest: dict = {
            self._wakeup_r: (self, self._on_wakeup, None),
            self.listener.fileno(): (self, self._on_accept, None),
        }
        conn = self.conn
        if conn is not None and not conn.closed:
            on_read = conn.on_readable if conn.wants_read else None
            on_write = conn.on_writable if conn.wants_write else None
            if on_read or on_write:
                interest[conn.fileno()] = (conn, on_read, on_write)
        accepting = not self.outbox.full
        interp = self.interp
        if interp is not None and interp.channel_open:
            on_read = interp.on_readable if accepting else None
            on_write = interp.on_writable if interp.wants_write else None
            if on_read or on_write:
                interest[interp.channel.fileno()] = (interp, on_read, on_write)
        # User output pipes are read only during a run (between runs, output waits in
        # the pipe for the next run) and only while the outbox has room.
        if self.run is not None and accepting:
            for pipe in self.run.pipes:
                interest[pipe.fd] = (pipe, self._pipe_reader(pipe), None)
        self.services.interest(interest)
        return interest

    def _pipe_reader(self, pipe):
        return _PipeReader(self, pipe)

    def _iterate(self):
        interest = self._interest()
        poller = select.poll()
        for fd, (_, on_read, on_write) in interest.items():
            poller.register(fd, (select.POLLIN if on_read else 0) | (select.POLLOUT if on_write else 0))
        timeout = self.services.poll_ms()
        try:
            events = poller.poll(POLL_MS if timeout is None else min(POLL_MS, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            events = []
        if not events:
            self._reap()
        for fd, mask in events:
            owner, on_read, on_write = interest[fd]
            if on_read is not None and mask & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self._dispatch(fd, owner, on_read, 1)
            # Errors on a write-only fd go to the writer, which then finds out.
            errors = (select.POLLHUP | select.POLLERR) if on_read is None else 0
            if on_write is not None and mask & (select.POLLOUT | errors):
                self._dispatch(fd, owner, on_write, 2)
        self.services.tick()

    def _dispatch(self, fd, owner, callback, index):
        # A handler earlier in this round may have closed this fd, and a new fd may have
        # taken its number: act only if it still means what it meant at poll time.
        current = self._interest().get(fd)
        if current is None or current[0] is not owner or current[index] != callback:
            return
        try:
            callback()
        except Exception as e:  # one fd must never take the runner down
            import traceback  # only here: start-up time matters, failures are rare

            log(f"error handling fd {fd}: {traceback.format_exc()}")
            if owner is not self:
                owner.fault(e)

    def _on_wakeup(self):
        try:
            while os.read(self._wakeup_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._reap()

    def _on_accept(self):
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log(f"accept failed: {e}")
            return
        if self.conn is not None:
            self.drop_connection(self.conn, "replaced by a new connection")
        self.conn = AgentConnection(self, sock)
        self.conn.reply(
            {
                "type": "hello",
                "protocol": PROTOCOL,
                "runner_version": RUNNER_VERSION,
                "python": "{}.{}.{}".format(*sys.version_info[:3]),
                "pid": os.getpid(),
                "runtime_type": self.options.runtime_type,
                "features": self.features(),
                "active_run": self.run.run_id if self.run is not None else None,
            }
        )

    def features(self) -> list:
        if self.supports_query:
            return [
                "query",
                "batch",
                "user-input",
                "complete",
                "interrupt",
                "cancel",
                "rich-output",
                "services",
                "claim",
            ]
        return ["batch", "interrupt", "cancel", "services", "claim"]

    def fault(self, error: BaseException) -> None:  # pragma: no cover - the listener and wakeup pipe
        pass

    def drop_connection(self, conn: Any, why: str) -> None:
        if conn.closed:
            return
        log(f"agent connection closed: {why}")
        conn.close()
        if self.conn is conn:
            self.conn = None
        for key, (interp, owner, agent_id) in list(self._completions.items()):
            if owner is conn:
                self._completions[key] = (interp, None, agent_id)

    # -- children ------------------------------------------------------------------

    def watch_child(self, pid: int, callback: Callable[[int], object]) -> None:
        self._children[pid] = callback

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:  # pragma: no cover
                continue
            if pid == 0:
                return
            callback = self._children.pop(pid, None)
            if callback is not None:  # else an orphan that we (as PID 1) inherited
                callback(status)

    def user_environ(self, kernel_environ: dict) -> dict:
        """The environment of user processes: the container's, the kernel's, then HOME and the user."""
        environ = dict(os.environ)
        environ.update(kernel_environ)
        for name in ("HOME", "USER", "LOGNAME"):
            if name in self.base_environ and (name == "HOME" or name not in kernel_environ):
                environ[name] = self.base_environ[name]
        return environ

    def claim(self, kernel_environ: dict) -> None:
        """
        A warm runner becomes a kernel's: from now on user processes get the kernel's
        environment, and the interpreter started for the pool (with none of it) is
        replaced by a fresh one.
        """
        self.identity.environ = self.user_environ(kernel_environ)
        old, self.interp = self.interp, None
        if old is not None and old.exited is not True:
            old.broken = old.broken or "replaced by the kernel's own"
            old.kill()
        if self.supports_query and self.run is None:
            self.ensure_interpreter()

    # -- the interpreter ----------------------------------------------------------

    def ensure_interpreter(self) -> Any:
        """The running interpreter, started if need be; None if it cannot start."""
        if self.interp is not None:
            if self.interp.broken is None:
                return self.interp
            # Broken and being killed: leave it to be reaped, and start afresh.
            self.interp = None
        interp = interpreter.InterpreterProcess(self, self.identity, self.options.runtime_path)
        try:
            interp.start()
        except procs.SpawnError as e:
            log(f"cannot start the interpreter: {e}")
            self._interp_error = str(e)
            return None
        self.interp = interp
        self.watch_child(interp.pid, lambda status: self._interpreter_exited(interp, status))
        return interp

    def interpreter_ready(self, interp: Any) -> None:
        pass

    def interpreter_started(self, interp: Any) -> None:
        run = self.run
        if isinstance(run, QueryRun) and run.interp is interp:
            run.on_started()

    def interpreter_output(self, interp: Any, stream: str, text: str) -> None:
        run = self.run
        if isinstance(run, QueryRun) and run.interp is interp:
            self.emit_output(stream, text)
        # else: leftovers of an interpreter already replaced; they belong to no run

    def interpreter_item(self, interp: Any, item: list) -> None:
        run = self.run
        if isinstance(run, QueryRun) and run.interp is interp:
            self.emit_item(item)

    def interpreter_waiting_input(self, interp: Any, request: int, prompt: str, is_password: bool) -> None:
        run = self.run
        if not isinstance(run, QueryRun) or run.interp is not interp:
            return
        run.waiting = {
            "request": request,
            "prompt": prompt,
            "is_password": is_password,
            "delivered": False,
        }
        self.announce_waiting(run)

    def announce_waiting(self, run: Any) -> None:
        """Tell the agent (now, or whoever connects next) that ``run`` waits for input."""
        waiting = run.waiting

        def delivered():
            waiting["delivered"] = True

        self.outbox.add(
            {
                "type": "waiting-input",
                "run_id": run.run_id,
                "prompt": waiting["prompt"],
                "is_password": waiting["is_password"],
            },
            on_sent=delivered,
        )

    def interpreter_done(self, interp: Any, exit_code: int) -> None:
        run = self.run
        if isinstance(run, QueryRun) and run.interp is interp and not run.cancelled:
            # Raw output (subprocesses, os.write) written during the run is in the pipes.
            for pipe in interp.pipes:
                pipe.drain(self.emit_output)
            self.finish_run(run, exit_code)

    def request_completions(self, interp: Any, conn: Any, agent_id: object, text: str) -> None:
        """Ask ``interp`` to complete ``text``; the answer goes to ``conn`` as ``agent_id``."""
        self._next_completion += 1
        self._completions[self._next_completion] = (interp, conn, agent_id)
        interp.send({"type": "complete", "id": self._next_completion, "text": text})

    def interpreter_completions(self, interp: Any, request_id: int, items: list) -> None:
        owner, conn, agent_id = self._completions.pop(request_id, (None, None, None))
        if owner is interp and conn is not None and conn is self.conn:
            conn.reply({"type": "completions", "id": agent_id, "items": items})

    def interpreter_broken(self, interp: Any, reason: str) -> None:
        log(f"{reason}; killing it")
        interp.killed = interp.kill()

    def _interpreter_exited(self, interp, status):
        # Everything it wrote before dying is in the channel and the pipes: take it.
        interp.drain()
        run = self.run
        if isinstance(run, QueryRun) and run.interp is interp:
            for pipe in interp.pipes:
                pipe.drain(self.emit_output)
            if run.cancelled:
                self.emit_output("stderr", "*** run cancelled; a fresh interpreter is started\n")
                exit_code = EXIT_CANCELLED
            else:
                if interp.killed and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    why = interp.broken  # we killed it: say why
                else:
                    why = f"the interpreter died ({procs.describe_status(status)})"
                self.emit_output("stderr", f"*** {why}; a fresh interpreter is started for the next run\n")
                exit_code = procs.exit_code(status) or (1 if interp.broken else 0)
            self.finish_run(run, exit_code)
        else:
            log(f"the idle interpreter ended ({procs.describe_status(status)})")
        interp.exited = True
        interp.close()
        if self.interp is interp:
            self.interp = None
        for key, (owner, conn, agent_id) in list(self._completions.items()):
            if owner is interp:
                del self._completions[key]
                if conn is not None and conn is self.conn:
                    conn.reply({"type": "completions", "id": agent_id, "items": []})
        # A fresh one now, so the next run starts fast; but only if this one had come
        # up fine (a broken runtime must not be restarted in a loop).
        if interp.ready and not self._stopping:
            self.ensure_interpreter()

    # -- runs ----------------------------------------------------------------------

    def emit(self, message: dict, on_sent: Callable[[], object] | None = None) -> None:
        self.outbox.add(message, on_sent)

    def emit_output(self, stream: str, text: str) -> None:
        run_id = self.run.run_id if self.run is not None else self.last_run_id
        self.outbox.add_output(run_id, stream, text)

    def emit_item(self, item: list) -> None:
        """A rich item (checked by ``interpreter.check_item``): a message of its own in the outbox."""
        run_id = self.run.run_id if self.run is not None else self.last_run_id
        try:
            self.outbox.add({"type": "rich", "run_id": run_id, "item": item})
        except framing.FrameError:  # display.MAX_ITEM keeps honest items well below
            kind = item[1][0] if item[0] == "media" else item[0]
            self.emit_output("stderr", f"*** {kind} output not shown: larger than a frame\n")

    def finish_run(self, run: Any, exit_code: int) -> None:
        if self.run is not run:
            return
        self.outbox.add({"type": "finished", "run_id": run.run_id, "exit_code": exit_code})
        self.last_run_id = run.run_id
        self.run = None

    def start_query(self, run_id: str, code: str) -> None:
        interp = self.ensure_interpreter()
        if interp is None:
            run = QueryRun(self, run_id, None)
            self.run = run
            self.emit_output("stderr", f"*** cannot start the interpreter: {self._interp_error}\n")
            self.finish_run(run, EXIT_NOT_STARTED)
            return
        self._seq += 1
        self.run = QueryRun(self, run_id, interp)
        interp.send({"type": "execute", "seq": self._seq, "code": code})

    def start_batch(self, run_id: str, options: dict, code: str) -> None:
        run = batch.BatchRun(self, run_id, options.get("build"), options.get("exec"), code)
        self.run = run
        run.start()

    # -- messages from the agent --------------------------------------------------------

    def handle(self, conn: Any, message: dict) -> None:
        """A message from the agent on ``conn`` (see ``messages.AgentMessages``)."""
        self._messages.handle(conn, message)

    # -- the end -------------------------------------------------------------------

    def shutdown(self) -> None:
        log("shutting down")
        if self.run is not None:
            self.run.shutdown()
        if self.interp is not None:
            self.interp.kill()
        self.services.shutdown()
        if self.conn is not None:
            self.conn.close()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.options.socket)
            except OSError:
                pass
        # Collect what we killed (briefly: exiting reaps the rest anyway).
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except (ChildProcessError, InterruptedError):
                pass


class _PipeReader:
    """Reads one user output pipe into the current run's output."""

    __slots__ = ("runner", "pipe")

    def __init__(self, runner: Runner, pipe: Any) -> None:
        self.runner = runner
        self.pipe = pipe

    def __call__(self):
        text, _ = self.pipe.read()
        if text:
            self.runner.emit_output(self.pipe.stream, text)

    def __eq__(self, other):
        return isinstance(other, _PipeReader) and other.pipe is self.pipe

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return id(self.pipe)


def read_user_environ(path: str) -> dict:
    """
    The kernel's environment for user processes, from ``path`` (a JSON object of strings
    that the agent wrote in the root-only run directory); empty when there is no such
    file. Entries that are not strings, or that no ``execve`` could carry, are dropped.
    """
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024 * 1024)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log(f"cannot read the kernel environment {path}: {e}")
        return {}
    try:
        environ = jsoncodec.loads(data.decode("utf-8"))
    except ValueError as e:
        log(f"the kernel environment {path} is not JSON: {e}")
        return {}
    if not isinstance(environ, dict):
        return {}
    return {
        name: value
        for name, value in environ.items()
        if isinstance(name, str)
        and isinstance(value, str)
        and name
        and "=" not in name
        and "\0" not in name
        and "\0" not in value
    }


def main(argv: list | None = None) -> int:
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n{USAGE}\n")
        return 2
    runner = Runner(options)
    try:
        runner.serve()
    except procs.SpawnError as e:
        log(str(e))
        return 2
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.ENOENT):
            log(f"cannot listen on {options.socket}: {e}")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
