"""
The standard streams of user code in the persistent interpreter (``query.py``), over
its channel to the runner: the channel itself (frames, see ``framing.py``), the one
ordered buffer behind ``sys.stdout``, ``sys.stderr`` and rich items (``display.py``),
``sys.stdin``/``input()``/``getpass`` answered with ``waiting-input``, and SIGINT held
back while a frame is being written or read.

Imported by ``query.py`` from the runner directory and then hidden from user code (see
there): tracebacks shown to the user leave this module's frames out too. Standard
library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

import codecs
import io
import os
import select
import sys
import threading
import time
import types

import framing
import jsoncodec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing into the user's process
if TYPE_CHECKING:
    from typing import Any

#: Output is flushed when this much is buffered, and otherwise after FLUSH_DELAY.
FLUSH_SIZE = 64 * 1024
FLUSH_DELAY = 0.01
#: Output chunks in the channel are at most this many characters.
CHUNK = 64 * 1024
#: Output written between runs is held up to this size; then writers (threads) block.
LATE_LIMIT = 1024 * 1024
#: The stream byte of a rich item's frame (the others are b"o" and b"e").
ITEM = b"r"
#: A prompt is cut at this length.
MAX_PROMPT = 64 * 1024

_MAIN_THREAD = threading.get_ident()
_forked = False  # set in children forked by user code (os.fork, multiprocessing)


def mark_forked() -> None:
    """In a child forked by user code: never touch the channel again (see ``Output``)."""
    global _forked
    _forked = True


def _encode_text(text):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return text.encode("utf-8", "replace")


# -- SIGINT: deferred inside critical sections ----------------------------------------


class _Interrupts:
    """
    ``armed`` while user code (or a completion) runs: only then does SIGINT raise
    ``KeyboardInterrupt``. ``critical`` is a context manager for the main thread's
    channel I/O: a SIGINT inside is held back and raised on the way out.
    """

    def __init__(self):
        self.armed = False
        self.depth = 0
        self.pending = False

    def handler(self, signum, frame):
        if not self.armed:
            return
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.get_ident() == _MAIN_THREAD:
            self.depth += 1
        return self

    def __exit__(self, *exc_info):
        if threading.get_ident() == _MAIN_THREAD:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                if self.armed:
                    raise KeyboardInterrupt
        return False


interrupts = _Interrupts()
critical = interrupts


# -- the channel to the runner ---------------------------------------------------------


class Channel:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._decoder = framing.FrameDecoder(messages=False)
        self._payloads: list = []
        # Threads write whole frames one at a time (a large write to a stream socket
        # can interleave with another thread's).
        self._write_lock = threading.RLock()

    def send_payload(self, payload: bytes) -> None:
        data = memoryview(framing.encode_payload(payload))
        with critical:
            with self._write_lock:
                while data:
                    data = data[os.write(self.fd, data) :]

    def send(self, message: dict) -> None:
        self.send_payload(jsoncodec.dumps(message).encode("utf-8", "replace"))

    def receive(self) -> dict:
        """The next message (a dict); ``EOFError`` when the runner has gone."""
        while not self._payloads:
            # Wait outside the critical section (a SIGINT may interrupt the wait, and
            # nothing is lost), then read inside it (nothing read may be dropped).
            select.select([self.fd], [], [])
            with critical:
                data = os.read(self.fd, 65536)
                if not data:
                    raise EOFError("the runner closed the channel")
                self._payloads.extend(self._decoder.feed(data))
        return jsoncodec.loads(self._payloads.pop(0).decode("utf-8"))


# -- ordered, coalesced output ------------------------------------------------------------


class Output:
    """
    The one ordered buffer behind sys.stdout and sys.stderr, and the rich items of
    ``display.py`` (``write_item``): each item is a segment of its own, sent whole as
    ``\\x01r`` + its JSON between the text around it, so the runner gets all in order.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        # Reentrant: a Python signal handler of user code may print while the main
        # thread is inside write() or a flush.
        self._cond = threading.Condition(threading.RLock())
        self._segments: list = []  # [stream byte, [texts]] in order
        self._size = 0
        self._flushing = False
        self.running = False
        thread = threading.Thread(target=self._flusher, name="bai-output-flusher")
        thread.daemon = True
        thread.start()

    def write(self, stream: bytes, text: str) -> None:
        if _forked:  # a forked child must not touch the channel: use the raw pipes
            os.write(1 if stream == b"o" else 2, _encode_text(text))
            return
        if not text:
            return
        with critical:
            with self._cond:
                if threading.get_ident() != _MAIN_THREAD:
                    while not self.running and self._size >= LATE_LIMIT:
                        self._cond.wait()
                if self._segments and self._segments[-1][0] == stream and stream != ITEM:
                    self._segments[-1][1].append(text)
                else:
                    self._segments.append([stream, [text]])
                was_empty = not self._size
                self._size += len(text)
                if self.running and self._size >= FLUSH_SIZE:
                    self._flush_locked()
                elif was_empty:
                    self._cond.notify_all()

    def write_item(self, payload: bytes) -> bool:
        """
        A rich item (its UTF-8 JSON, see ``display.py``): a segment of its own in the
        ordered buffer, sent at once during a run. False in a forked child (no channel).
        """
        if _forked:
            return False
        self.write(ITEM, payload)  # type: ignore[arg-type]  # bytes: sent as they are
        self.flush()
        return True

    def flush(self) -> None:
        if _forked:
            return
        with critical:
            with self._cond:
                if self.running:
                    self._flush_locked()

    def _flush_locked(self):
        if self._flushing:  # re-entered (a signal handler printed): the next flush takes it
            return
        self._flushing = True
        try:
            segments, self._segments, self._size = self._segments, [], 0
            for stream, texts in segments:
                if stream == ITEM:  # one item, never cut: display.MAX_ITEM bounds it
                    self._channel.send_payload(b"\x01" + stream + texts[0])
                    continue
                text = "".join(texts)
                for start in range(0, len(text), CHUNK):
                    self._channel.send_payload(b"\x01" + stream + _encode_text(text[start : start + CHUNK]))
        finally:
            self._flushing = False
        self._cond.notify_all()  # writers held back between runs may go on

    def start_run(self) -> None:
        with critical:
            with self._cond:
                self.running = True
                self._flush_locked()  # what threads wrote since the last run

    def end_run(self) -> None:
        with critical:
            with self._cond:
                self._flush_locked()
                self.running = False

    def _flusher(self):
        while True:
            with self._cond:
                while not (self._size and self.running):
                    self._cond.wait()
            time.sleep(FLUSH_DELAY)
            with self._cond:
                if self.running and self._size:
                    self._flush_locked()


class _BinaryWriter(io.RawIOBase):
    """``sys.stdout.buffer``: bytes, decoded as UTF-8 into the same ordered buffer."""

    def __init__(self, text_writer):
        self._text = text_writer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        self._text.write(self._decoder.decode(data))
        return len(data)

    def flush(self):
        self._text.flush()

    def fileno(self):
        return self._text.fileno()

    def close(self):
        self.flush()


class TextWriter(io.TextIOBase):
    """sys.stdout / sys.stderr of user code."""

    encoding = "utf-8"
    errors = "replace"
    line_buffering = False
    mode = "w"

    def __init__(self, output: Output, stream: bytes, fd: int, name: str) -> None:
        self._output = output
        self._stream = stream
        self._fd = fd
        self._name = name
        self.buffer = _BinaryWriter(self)

    @property
    def name(self) -> str:
        return self._name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._output.write(self._stream, text)
        return len(text)

    def flush(self) -> None:
        self._output.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # The raw pipe: a subprocess given sys.stdout writes there, and still shows.
        return self._fd

    def reconfigure(self, **options: object) -> None:
        pass

    def close(self) -> None:
        # Closing the kernel's stdout would only lose output; flush instead.
        self.flush()


# -- input --------------------------------------------------------------------------------


class Input:
    def __init__(self, channel: Channel, output: Output) -> None:
        self._channel = channel
        self._output = output
        self._lock = threading.Lock()
        self._requests = 0

    def request(self, prompt: object, is_password: bool) -> str:
        """Ask the runner for a line of input; block until it comes."""
        if _forked or not self._output.running:
            raise EOFError("input is only available while a run is active")
        prompt = str(prompt)[:MAX_PROMPT]
        with self._lock:
            self._requests += 1
            request = self._requests
            self._output.flush()
            self._channel.send(
                {
                    "type": "waiting-input",
                    "request": request,
                    "prompt": prompt,
                    "is_password": bool(is_password),
                }
            )
            while True:
                message = self._channel.receive()
                # An answer to an earlier request (one that an interrupt cut short) may
                # still be on its way: only this request's answer counts.
                if message.get("type") == "input" and message.get("request") == request:
                    data = message.get("data")
                    return data if isinstance(data, str) else ""


class InputReader(io.TextIOBase):
    """sys.stdin of user code: each line read is asked for with ``waiting-input``."""

    encoding = "utf-8"
    errors = "replace"
    mode = "r"
    name = "<stdin>"

    def __init__(self, input_: Input) -> None:
        self._input = input_

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]  # text, as TextIOBase
        line = self._input.request("", False)
        return line if line.endswith("\n") else line + "\n"

    def read(self, size: int | None = -1) -> str:
        return self.readline()

    def close(self) -> None:
        pass


def strip_newline(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def install_getpass(input_: Input) -> None:
    def getpass(prompt="Password: ", stream=None):
        return strip_newline(input_.request(prompt, True))

    module: Any  # the real getpass module, or the stand-in made here
    try:
        import getpass as module
    except ImportError:  # python3-minimal has no getpass: offer a small one
        module = types.ModuleType("getpass")
        module.__doc__ = "getpass for the kernel (the image has none)"

        class GetPassWarning(UserWarning):
            pass

        def getuser():
            for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
                if os.environ.get(name):
                    return os.environ[name]
            import pwd

            return pwd.getpwuid(os.getuid())[0]

        module.GetPassWarning = GetPassWarning
        module.getuser = getuser
        sys.modules["getpass"] = module
    module.getpass = getpass
    module.unix_getpass = getpass
    module.fallback_getpass = getpass
