"""
The agent's side of the runner: the outbox of messages for the agent, and the one agent
connection at a time that drains it.

Run messages (output, waiting-input, build-finished, finished) go through the outbox, in
order, and leave it only once completely written to a connection: a connection lost in
the middle of a frame leaves that frame to the next connection, which starts where the
last one stopped. Control answers (hello, pong, completions, interrupt-result, error)
belong to one connection and go ahead of the outbox, between frames.
"""

from __future__ import annotations

import collections

import framing
import procs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any, Callable

#: Output messages carry at most this many characters.
CHUNK = procs.CHUNK
#: At most this much is handed to the socket in one go.
SEND_BATCH = 256 * 1024
#: Control answers waiting for an agent that does not read: beyond this, the runner
#: stops reading from that agent too.
PRIORITY_LIMIT = 1024 * 1024


class _Entry:
    """
    One message in the outbox. An output message stays open (``data`` None, text in
    ``parts``) until a connection takes it, so that small writes arriving meanwhile
    join it instead of each making a frame.
    """

    __slots__ = ("data", "on_sent", "size", "run_id", "stream", "parts", "chars")

    # Set for output messages only (see ``Outbox.add_output``).
    run_id: object
    stream: str
    parts: list
    chars: int

    def __init__(self, data: bytes | None = None, on_sent: Callable[[], object] | None = None) -> None:
        self.data = data
        self.on_sent = on_sent
        self.size = len(data) if data is not None else 0
        self.parts = None  # type: ignore[assignment]  # not an open output message

    def open_for(self, run_id: object, stream: str, room: int) -> bool:
        return self.data is None and self.run_id == run_id and self.stream == stream and self.chars < room


class Outbox:
    """Messages for the agent, in order, kept until completely written to a connection."""

    #: Estimated framing and JSON overhead of an output message, for the size count.
    OUTPUT_OVERHEAD = 80

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: collections.deque = collections.deque()
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def add(self, message: dict, on_sent: Callable[[], object] | None = None) -> None:
        entry = _Entry(framing.encode(message), on_sent)
        self.entries.append(entry)
        self.size += entry.size

    def add_output(self, run_id: object, stream: str, text: str) -> None:
        """Output text, joined to the last message while that is open and small enough."""
        while text:
            tail = self.entries[-1] if self.entries else None
            if tail is None or not tail.open_for(run_id, stream, CHUNK):
                tail = _Entry()
                tail.run_id, tail.stream, tail.parts, tail.chars = run_id, stream, [], 0
                tail.size = self.OUTPUT_OVERHEAD
                self.entries.append(tail)
                self.size += tail.size
            piece = text[: CHUNK - tail.chars]
            text = text[len(piece) :]
            tail.parts.append(piece)
            tail.chars += len(piece)
            tail.size += len(piece)
            self.size += len(piece)

    def freeze(self, entry: _Entry) -> bytes:
        """The frame of ``entry``, encoded now if it was still open."""
        if entry.data is None:
            # Keep this key order and the compact encoding: the agent passes the escaped
            # data on without decoding it when the frame has exactly this shape
            # (kernels/runner_link.py, split_output_frame).
            entry.data = framing.encode(
                {
                    "type": "output",
                    "run_id": entry.run_id,
                    "stream": entry.stream,
                    "data": "".join(entry.parts),
                }
            )
            entry.parts = None  # type: ignore[assignment]  # no longer open
            self.size += len(entry.data) - entry.size
            entry.size = len(entry.data)
        return entry.data

    def sent(self, entry: _Entry) -> None:
        head = self.entries.popleft()
        assert head is entry
        self.size -= entry.size
        if entry.on_sent is not None:
            entry.on_sent()


class AgentConnection:
    """One agent connection; ``runner`` handles its messages and owns the outbox."""

    def __init__(self, runner: Any, sock: Any) -> None:
        self.runner = runner
        self.sock = sock
        sock.setblocking(False)
        self.decoder = framing.FrameDecoder()
        self.priority: collections.deque = collections.deque()
        self.priority_size = 0
        self.handshaken = False
        self.closing = False  # close once the pending answers are written
        self.closed = False
        self._batch: memoryview | None = None
        self._batch_frames: list = []  # (end offset, outbox entry or None) in the batch
        self._sent = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def reply(self, message: dict) -> None:
        """Queue a control answer, ahead of the outbox (but never inside a frame)."""
        if self.closed:
            return
        frame = framing.encode(message)
        self.priority.append(frame)
        self.priority_size += len(frame)

    @property
    def wants_read(self) -> bool:
        return not self.closed and not self.closing and self.priority_size < PRIORITY_LIMIT

    @property
    def wants_write(self) -> bool:
        if self.closed:
            return False
        return bool(self._batch or self.priority or (self.handshaken and self.runner.outbox.entries))

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.runner.drop_connection(self, f"read failed: {e}")
            return
        if not data:
            self.runner.drop_connection(self, "closed by the agent")
            return
        try:
            messages = self.decoder.feed(data)
        except framing.FrameError as e:
            for message in e.messages:
                self.runner.handle(self, message)
            self.runner.drop_connection(self, f"bad frame: {e}")
            return
        for message in messages:
            if self.closed or self.closing:
                break
            self.runner.handle(self, message)

    def _fill_batch(self):
        parts = []
        size = 0
        while self.priority and size < SEND_BATCH:
            frame = self.priority.popleft()
            self.priority_size -= len(frame)
            parts.append(frame)
            size += len(frame)
            self._batch_frames.append((size, None))
        if self.handshaken and not self.closing:
            outbox = self.runner.outbox
            for entry in outbox.entries:
                if size >= SEND_BATCH:
                    break
                data = outbox.freeze(entry)
                parts.append(data)
                size += len(data)
                self._batch_frames.append((size, entry))
        if parts:
            self._batch = memoryview(b"".join(parts))
            self._sent = 0

    def on_writable(self) -> None:
        if self._batch is None:
            self._fill_batch()
            if self._batch is None:
                return
        try:
            sent = self.sock.send(self._batch[self._sent :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.runner.drop_connection(self, f"write failed: {e}")
            return
        self._sent += sent
        # Outbox messages leave the outbox only once completely written: a connection
        # lost mid-frame leaves that frame for the next connection.
        while self._batch_frames and self._batch_frames[0][0] <= self._sent:
            _, entry = self._batch_frames.pop(0)
            if entry is not None:
                self.runner.outbox.sent(entry)
        if self._sent == len(self._batch):
            self._batch = None
            if self.closing and not self.priority:
                self.runner.drop_connection(self, "closed after an error")

    def fault(self, error: BaseException) -> None:
        self.runner.drop_connection(self, f"runner error: {error!r}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._batch = None
            self._batch_frames = []
            self.priority.clear()
            self.priority_size = 0
            self.sock.close()
