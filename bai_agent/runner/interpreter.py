"""
The runner's handle on the persistent interpreter (``query.py`` running as the user).

The interpreter is untrusted: user code can write anything to the channel fd, close it,
or die in any way. Everything it sends is validated here, and anything unexpected marks
it *broken*; the runner then kills it and starts a fresh one. Messages for the agent are
always rebuilt by the runner, never forwarded as they came.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

import framing
import jsoncodec
import procs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any

QUERY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "query.py")

#: Output frames start with this byte, then b"o" or b"e" (see query.py), or b"r" for a
#: rich item.
OUTPUT_TAG = 0x01
_STREAMS = {ord("o"): "stdout", ord("e"): "stderr"}
_ITEM = ord("r")
#: The media types of rich items (docs/protocol.md section 10).
MEDIA_TYPES = ("image/png", "image/svg+xml")


def check_item(item: object) -> str | None:
    """What is wrong with a rich item (``["html", TEXT]``, ``["media", [MIME, DATA]]``); None if nothing."""
    if not isinstance(item, list) or len(item) != 2 or item[0] not in ("html", "media"):
        return 'not ["html" or "media", data]'
    kind, data = item
    if kind == "html":
        return None if isinstance(data, str) else "html data is not text"
    if not (isinstance(data, list) and len(data) == 2 and all(isinstance(part, str) for part in data)):
        return "media data is not [mime, data]"
    if data[0] not in MEDIA_TYPES:
        return f"unknown media type {data[0][:40]!r}"
    return None


class ChildProtocolError(Exception):
    """The interpreter sent something it should not have."""


class InterpreterProcess:
    """
    One interpreter child. ``listener`` receives its events:

    - ``interpreter_ready(interp)``
    - ``interpreter_started(interp)``: the run's code starts (SIGINT works from now)
    - ``interpreter_output(interp, stream, text)``
    - ``interpreter_item(interp, item)``: a rich item, checked (``check_item``); one
      that is malformed comes as ``interpreter_output`` on stderr, saying so
    - ``interpreter_waiting_input(interp, request, prompt, is_password)``
    - ``interpreter_done(interp, exit_code)``
    - ``interpreter_completions(interp, request_id, items)``
    - ``interpreter_broken(interp, reason)``: the channel is unusable (the process may live)
    """

    def __init__(self, listener: Any, identity: Any, runtime_path: str) -> None:
        self._listener = listener
        self._identity = identity
        self._runtime_path = runtime_path
        self.pid = None
        self.ready = False
        self.broken = None  # the reason, once broken
        self.killed = False  # by the runner, because it broke
        self.exited = False
        self.channel: Any = None  # our end of the socket pair, while the process lives
        self._decoder = framing.FrameDecoder(messages=False)
        self._to_child = bytearray()
        self.stdout = None
        self.stderr = None

    # -- life --------------------------------------------------------------------

    def start(self) -> None:
        """Start the process; raise ``procs.SpawnError`` if it cannot be."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = procs.nonblocking_pipe()
        err_r, err_w = procs.nonblocking_pipe()
        devnull = procs.open_devnull()
        argv = [self._runtime_path, "-u", QUERY_SCRIPT, "--fd", str(theirs.fileno())]
        try:
            self.pid = procs.spawn(argv, self._identity, devnull, out_w, err_w, pass_fds=(theirs.fileno(),))
        except procs.SpawnError:
            ours.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            theirs.close()
            for fd in (out_w, err_w, devnull):
                os.close(fd)
        ours.setblocking(False)
        self.channel = ours
        self.stdout = procs.OutputPipe(out_r, "stdout")
        self.stderr = procs.OutputPipe(err_r, "stderr")

    @property
    def pipes(self) -> list:
        return [p for p in (self.stdout, self.stderr) if p is not None and not p.closed]

    def signal(self, signum: int) -> bool:
        """Signal the interpreter's process group (it leads its own session)."""
        if self.pid is None or self.exited:
            return False
        return procs.signal_group(self.pid, signum)

    def interrupt(self) -> bool:
        return self.signal(signal.SIGINT)

    def kill(self) -> bool:
        return self.signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the runner's ends (after the process has been reaped)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()

    # -- the channel ---------------------------------------------------------------

    @property
    def channel_open(self) -> bool:
        return self.channel is not None and self.broken is None

    def send(self, message: dict) -> None:
        if self.channel_open:
            self._to_child += framing.encode(message)

    @property
    def wants_write(self) -> bool:
        return self.channel_open and bool(self._to_child)

    @property
    def queued_to_child(self) -> int:
        return len(self._to_child)

    def on_writable(self) -> None:
        try:
            sent = self.channel.send(self._to_child)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._break(f"cannot write to the interpreter: {e}")
            return
        del self._to_child[:sent]

    def on_readable(self, limit: int = 256 * 1024) -> None:
        """Read and handle what the channel has (at most ``limit`` bytes)."""
        try:
            data = self.channel.recv(limit)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno == errno.ECONNRESET:
                data = b""
            else:
                self._break(f"cannot read from the interpreter: {e}")
                return
        if not data:
            self._break("the interpreter closed its channel")
            return
        try:
            payloads = self._decoder.feed(data)
        except framing.FrameError as e:
            self._handle_all(e.messages)
            self._break(f"the interpreter sent a bad frame ({e})")
            return
        self._handle_all(payloads)

    def drain(self, limit: int = 4 * 1024 * 1024) -> None:
        """Handle what is left in the channel, after the process has died."""
        taken = 0
        while self.channel_open and taken < limit:
            try:
                data = self.channel.recv(256 * 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            taken += len(data)
            try:
                payloads = self._decoder.feed(data)
            except framing.FrameError as e:
                self._handle_all(e.messages)
                self._break(f"the interpreter sent a bad frame ({e})")
                return
            self._handle_all(payloads)

    def fault(self, error: BaseException) -> None:
        self._break(f"runner error on the interpreter channel: {error!r}")

    def _break(self, reason):
        if self.broken is None:
            self.broken = reason
            self._listener.interpreter_broken(self, reason)

    def _handle_all(self, payloads):
        for payload in payloads:
            if self.broken is not None:
                return
            try:
                self._handle(payload)
            except ChildProtocolError as e:
                self._break(f"the interpreter sent a bad message ({e})")

    def _handle(self, payload):
        if payload[:1] == bytes([OUTPUT_TAG]):
            if payload[1:2] == bytes([_ITEM]):
                self._handle_item(payload[2:])
                return
            stream = _STREAMS.get(payload[1]) if len(payload) > 1 else None
            if stream is None:
                raise ChildProtocolError("output for an unknown stream")
            text = payload[2:].decode("utf-8", "replace")
            if text:
                self._listener.interpreter_output(self, stream, text)
            return
        try:
            message = framing.decode_message(payload)
        except framing.FrameError as e:
            raise ChildProtocolError(str(e)) from e
        kind = message["type"]
        self._handle_message(kind, message)

    def _handle_item(self, data):
        # The frame is whole, only its content can be wrong (user code wrote to the
        # channel fd, or a bug): say so in the run's output, the channel lives on.
        try:
            item = jsoncodec.loads(bytes(data).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            problem: str | None = f"not JSON ({str(e)[:80]})"
        else:
            problem = check_item(item)
        if problem is None:
            self._listener.interpreter_item(self, item)
        else:
            self._listener.interpreter_output(self, "stderr", f"*** a rich output item was dropped: {problem}\n")

    def _handle_message(self, kind, message):
        if kind == "ready":
            self.ready = True
            self._listener.interpreter_ready(self)
        elif kind == "started":
            self._listener.interpreter_started(self)
        elif kind == "done":
            code = message.get("exit_code")
            if not isinstance(code, int) or isinstance(code, bool):
                raise ChildProtocolError("done without an integer exit_code")
            self._listener.interpreter_done(self, code)
        elif kind == "waiting-input":
            request, prompt = message.get("request"), message.get("prompt")
            if not isinstance(request, int) or not isinstance(prompt, str):
                raise ChildProtocolError("waiting-input without request and prompt")
            self._listener.interpreter_waiting_input(self, request, prompt[:65536], bool(message.get("is_password")))
        elif kind == "completions":
            items = message.get("items")
            if not isinstance(items, list):
                raise ChildProtocolError("completions without items")
            items = [item for item in items if isinstance(item, str)][:1000]
            self._listener.interpreter_completions(self, message.get("id"), items)
        else:
            raise ChildProtocolError(f"unknown message type {kind[:40]!r}")


__all__ = ["InterpreterProcess", "ChildProtocolError", "QUERY_SCRIPT", "check_item"]
