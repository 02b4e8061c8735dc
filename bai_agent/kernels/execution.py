"""
Running code in a kernel: the agent's side of ``Execute`` (PROTOCOL.md section 2).

One ``ExecutionSession`` per runner link. It starts runs on the runner, collects their
output and status messages, and answers ``Execute`` calls:

- a call returns when the run reaches a status (``build-finished``, ``waiting-input``,
  ``finished``, ``exec-timeout``), or after ``flush_timeout`` seconds with ``continued``
  and the output so far, or at once with ``continued`` when the output buffer is full;
- output that arrived before a status goes with that status, output after it with the
  next call, so a batch run's build output and exec output never mix;
- output stays JSON-escaped as the runner sent it, and the ``console`` is assembled as
  JSON bytes (``RawJson``): the agent never decodes and re-encodes it;
- a rich item of a query run (``rich`` from the runner: ``["html", TEXT]`` or
  ``["media", [MIME, DATA]]``, PROTOCOL.md section 10) is checked and becomes an entry of
  its own, in order: the stdout text before it and after it are not joined; one that is
  not of a declared shape becomes a note on stderr;
- the buffer is capped: past ``BUFFER_LIMIT`` bytes the agent stops reading the runner's
  socket, the runner stops reading user output, and user code blocks on write until the
  manager collects with ``continue``. So any amount of output arrives whole, in order,
  with bounded memory.

One run at a time per kernel (``RUN_CONFLICT``); a new run may start once the runner has
reported the previous one finished, and discards what no manager collected of it.
"""

from __future__ import annotations

import collections
import json
import math
import uuid
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from bai_agent.protocol import console, errors
from bai_agent.protocol.arguments import RawJson
from bai_agent.values import KERNEL_ID_PATTERN

if TYPE_CHECKING:
    from bai_agent.kernels.runner_link import RunnerLink

MAX_CODE_BYTES = 1 << 20
BUFFER_LIMIT = 8 << 20
#: A waiting call is answered once this much output is buffered: smaller answers keep the
#: runner, the agent and the manager busy at once instead of taking turns.
ANSWER_AT = 2 << 20
DEFAULT_FLUSH_TIMEOUT = 2.0
MAX_FLUSH_TIMEOUT = 300.0
MODES = ("query", "batch", "input", "continue")
#: The console entry type of a rich item, already encoded whole (never a stream name).
_ITEM = "item"
EXIT_CANCELLED = 137


class Run:
    """One run: its output since the last collection, and the statuses not yet told."""

    def __init__(self, run_id: str, mode: str) -> None:
        self.run_id = run_id
        self.mode = mode
        # [type, [pieces]] pairs: consecutive output of one stream is joined once, when
        # taken (joining as it comes would copy the growing text at every message).
        self.console: list[list[Any]] = []
        self.buffered = 0
        self.statuses: collections.deque[tuple] = collections.deque()  # (status, exit_code, console, options)
        self.finished = False
        self.timed_out = False
        self.timeout_call: IDelayedCall | None = None

    def add_output(self, stream: str, text: str) -> None:
        self.add_raw_output(stream, json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"))

    def add_raw_output(self, stream: str, raw: bytes) -> None:
        """Output still JSON-escaped, as the runner sent it (see ``split_output_frame``)."""
        if self.console and self.console[-1][0] == stream:
            self.console[-1][1].append(raw)
        else:
            self.console.append([stream, [raw]])
        self.buffered += len(raw)

    def add_item(self, item: object) -> None:
        """A rich item from the runner: checked, then an entry of its own (or a note on stderr)."""
        try:
            parsed = console.parse_item(item)
            if not isinstance(parsed, (console.Media, console.Html)):
                raise ValueError(f"{parsed.stream} is not a rich item type")
        except ValueError as e:
            self.add_output("stderr", f"*** a malformed rich output item from the kernel was dropped: {e}\n")
            return
        if isinstance(parsed, console.Html):
            entry: list = [console.HTML, parsed.text]
        else:
            entry = [console.MEDIA, [parsed.mime, parsed.data]]
        raw = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
        self.console.append([_ITEM, [raw]])
        self.buffered += len(raw)

    def take_console(self) -> RawJson:
        result = RawJson(
            b"["
            + b",".join(
                pieces[0] if stream == _ITEM else b'["' + stream.encode("ascii") + b'","' + b"".join(pieces) + b'"]'
                for stream, pieces in self.console
            )
            + b"]"
        )
        self.console, self.buffered = [], 0
        return result

    def add_status(self, status: str, exit_code: int | None = None, options: dict | None = None) -> None:
        self.statuses.append((status, exit_code, self.take_console(), options))


class ExecutionSession:
    """
    :param link: the kernel's ``RunnerLink`` (its ``handler`` is set here).
    :param clock: ``IReactorTime`` for flush and exec timeouts.
    :param exec_timeout: seconds a run may take (0: no limit).
    :param on_activity: called on every call and message, to refresh the idle timeout.
    """

    log = Logger()

    def __init__(
        self,
        kernel_id: str,
        link: RunnerLink,
        clock: IReactorTime,
        exec_timeout: int = 0,
        on_activity: Callable[[], object] = lambda: None,
    ) -> None:
        self.kernel_id = kernel_id
        self.link = link
        self.clock = clock
        self.exec_timeout = exec_timeout
        self.on_activity = on_activity
        self.run: Run | None = None
        self.waiter: tuple[Deferred[dict], IDelayedCall] | None = None  # of the Execute call waiting, if any
        self.paused = False
        self.closed: str | None = None  # why the session ended
        link.handler = self.handle
        link.dead.addCallback(self._link_dead)

    # -- Execute ---------------------------------------------------------------------------

    def execute(self, mode: str, code: str, run_id: str | None = None, options: dict | None = None) -> Deferred[dict]:
        """Fire with the ``Execute`` answer (a dict); declared errors for bad calls."""
        if self.closed is not None:
            raise errors.KernelNotRunning(f"kernel {self.kernel_id} is not running ({self.closed})")
        if mode not in MODES:
            raise errors.InvalidRequest(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        options = _check_options(options)
        flush_timeout = options.get("flush_timeout", DEFAULT_FLUSH_TIMEOUT)
        if len(code.encode("utf-8")) > MAX_CODE_BYTES:
            raise errors.InvalidRequest(f"code is larger than {MAX_CODE_BYTES} bytes")
        if run_id is not None and not KERNEL_ID_PATTERN.match(run_id):
            raise errors.InvalidRequest(f"run_id must match {KERNEL_ID_PATTERN.pattern}")
        self.on_activity()
        if mode in ("query", "batch"):
            self._start(mode, code, run_id or uuid.uuid4().hex, options)
        else:
            run = self._active(run_id, mode)
            if self.waiter is not None:
                # A call is still waiting on this run (often one whose manager went
                # away): it gets what was collected so far, and this one takes over.
                self._maybe_answer(flushing=True)
            if mode == "input":
                if not self._waiting_input:
                    raise errors.InvalidRequest(f"run {run.run_id} is not waiting for input")
                self._waiting_input = False
                self.link.send({"type": "input", "run_id": run.run_id, "data": code})
        return self._answer_when_ready(flush_timeout)

    _waiting_input = False

    def _start(self, mode, code, run_id, options):
        if self.run is not None and not self.run.finished:
            raise errors.RunConflict(f"run {self.run.run_id} is still active on kernel {self.kernel_id}")
        self.run = Run(run_id, mode)
        self._waiting_input = False
        self._resume()
        message = {"type": "execute", "run_id": run_id, "mode": mode, "code": code}
        if mode == "batch":
            message["options"] = {"build": options.get("build"), "exec": options.get("exec")}
        self.link.send(message)
        if self.exec_timeout:
            self.run.timeout_call = self.clock.callLater(self.exec_timeout, self._exec_timeout, self.run)

    def _active(self, run_id, mode):
        run = self.run
        if run is None or (run.finished and not run.statuses):
            raise errors.InvalidRequest(f"{mode}: there is no active run on kernel {self.kernel_id}")
        if run_id is not None and run_id != run.run_id:
            raise errors.InvalidRequest(f"{mode}: run {run_id!r} is not the active run ({run.run_id})")
        return run

    def _answer_when_ready(self, flush_timeout):
        d: Deferred[dict] = Deferred()
        timer = self.clock.callLater(flush_timeout, self._flush)
        self.waiter = (d, timer)
        self._maybe_answer()
        return d

    def _maybe_answer(self, flushing=False):
        if self.waiter is None or self.run is None:
            return
        run = self.run
        if run.statuses:
            status, exit_code, console, options = run.statuses.popleft()
        elif flushing or run.buffered >= ANSWER_AT:
            status, exit_code, console, options = "continued", None, run.take_console(), None
        else:
            return
        d, timer = self.waiter
        self.waiter = None
        if timer.active():
            timer.cancel()
        self._resume()
        answer = {"run_id": run.run_id, "status": status, "console": console}
        if exit_code is not None:
            answer["exit_code"] = exit_code
        if options:
            answer["options"] = options
        d.callback(answer)

    def _flush(self):
        self._maybe_answer(flushing=True)

    # -- other commands --------------------------------------------------------------------

    def interrupt(self) -> Deferred[dict]:
        if self.closed is not None:
            raise errors.KernelNotRunning(f"kernel {self.kernel_id} is not running ({self.closed})")
        self.on_activity()

        def told(ok: bool) -> dict:
            if not ok:
                raise errors.KernelNotRunning(f"nothing runs on kernel {self.kernel_id}")
            return {}

        return self.link.interrupt().addCallback(told)

    def completions(self, text: str, options: dict | None = None) -> Deferred[list]:
        if self.closed is not None:
            raise errors.KernelNotRunning(f"kernel {self.kernel_id} is not running ({self.closed})")
        if options is not None and not isinstance(options, dict):
            raise errors.InvalidRequest("options must be an object")
        self.on_activity()
        return self.link.request_completions(text, options or {})

    # -- from the runner -------------------------------------------------------------------

    def handle(self, message: dict) -> None:
        run = self.run
        kind = message.get("type")
        if run is None or message.get("run_id") not in (None, run.run_id):
            return  # the tail of a discarded run
        if kind in ("output", "output-raw"):
            stream = "stderr" if message.get("stream") == "stderr" else "stdout"
            if kind == "output-raw":
                run.add_raw_output(stream, message["raw"])
            else:
                run.add_output(stream, str(message.get("data", "")))
            self._check_buffer(run)
        elif kind == "rich":
            if run.mode == "query":
                run.add_item(message.get("item"))
            else:  # batch runs have no rich output: the runner never sends it
                run.add_output("stderr", "*** a rich output item in a batch run was dropped\n")
            self._check_buffer(run)
        elif kind == "waiting-input":
            prompt = str(message.get("prompt") or "")
            if prompt:
                run.add_output("stdout", prompt)
            self._waiting_input = True
            run.add_status("waiting-input", None, {"is_password": bool(message.get("is_password"))})
        elif kind == "build-finished":
            run.add_status("build-finished", message.get("exit_code"))
        elif kind == "finished":
            self._finish(run, message.get("exit_code"))
        elif kind == "error":
            code = message.get("code")
            if message.get("run_id") == run.run_id and not run.finished:
                # The runner refused the run (e.g. a query on a shell runtime).
                run.add_output("stderr", f"{code}: {message.get('message', '')}\n")
                self._finish(run, 1)
        else:
            return
        self.on_activity()
        self._maybe_answer()

    def _check_buffer(self, run):
        if run.buffered >= BUFFER_LIMIT and not self.paused:
            # The manager reads slowly: stop reading the runner until it collects.
            self.paused = True
            self.link.pauseProducing()

    def _finish(self, run, exit_code):
        run.finished = True
        self._waiting_input = False
        if run.timeout_call is not None and run.timeout_call.active():
            run.timeout_call.cancel()
        run.add_status("exec-timeout" if run.timed_out else "finished", exit_code)

    def _exec_timeout(self, run: Run) -> None:
        if run is self.run and not run.finished:
            self.log.info(
                "run {run_id} on kernel {kernel_id} exceeded its {timeout}s exec timeout",
                run_id=run.run_id,
                kernel_id=self.kernel_id,
                timeout=self.exec_timeout,
            )
            run.timed_out = True
            self._resume()
            self.link.send({"type": "cancel", "run_id": run.run_id})

    def _resume(self):
        if self.paused:
            self.paused = False
            self.link.resumeProducing()

    def _link_dead(self, reason):
        self.closed = reason or "runner lost"
        if self.run is not None and self.run.timeout_call is not None and self.run.timeout_call.active():
            self.run.timeout_call.cancel()
        if self.waiter is not None:
            d, timer = self.waiter
            self.waiter = None
            if timer.active():
                timer.cancel()
            d.errback(errors.KernelNotRunning(f"kernel {self.kernel_id} stopped running: {self.closed}"))
        return reason


def _check_options(options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise errors.InvalidRequest("options must be an object")
    flush_timeout = options.get("flush_timeout", DEFAULT_FLUSH_TIMEOUT)
    if (
        isinstance(flush_timeout, bool)
        or not isinstance(flush_timeout, (int, float))
        or not math.isfinite(flush_timeout)
        or not 0 <= flush_timeout <= MAX_FLUSH_TIMEOUT
    ):
        raise errors.InvalidRequest(f"options.flush_timeout must be 0 to {MAX_FLUSH_TIMEOUT} seconds")
    for key in ("build", "exec"):
        value = options.get(key)
        if value is not None and not isinstance(value, str):
            raise errors.InvalidRequest(f"options.{key} must be a shell command (a string)")
    return options
