"""
The event journal (PROTOCOL.md section 3): every event the agent reports to managers,
numbered by ``seq``, kept on disk so that a manager that reconnects, or an agent that
restarts, loses nothing.

The journal is an append-only JSON-lines file, one event per line, under ``--state-dir``.
An append writes one short line and flushes it (``os.fsync`` by default), so its cost on the
reactor thread is small and bounded; the rare compaction rewrites at most ``keep`` lines that
are already serialised in memory. Reading the file happens once, in ``open()``.

What survives a crash, and why:

- A line torn by a kill mid-write (or any other line that does not parse) is skipped with a
  warning; trailing damage is cut off before the next append so that it cannot glue itself to
  a good line.
- The kept events are always consecutive seqs. A hole (a damaged line that was an event) makes
  the events before it unservable: replaying across the hole would silently drop an event,
  which at-least-once delivery forbids, so asking for them gives ``EVENTS_EXPIRED`` instead.
- ``seq`` only grows: the highest seq handed out is also written to a side file
  ``{path}.seq`` (at open, at compaction and at close), and ``open()`` continues after the
  larger of the two, so a journal file deleted while the agent was stopped reuses nothing.
"""

import collections
import itertools
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bai_agent.protocol import events
from bai_agent.protocol.errors import EventsExpired, InvalidRequest

log = Logger()

# For the checks of ``append``: sets of the protocol's tuples.
EVENT_TYPES = frozenset(events.EVENT_TYPES)
#: ``data["reason"]`` of a ``kernel-terminated`` event.
TERMINATION_REASONS = frozenset(events.TERMINATION_REASONS)

DEFAULT_KEEP = 10000


def _dumps(value) -> str:
    # Compact, ASCII-only, strict JSON (no NaN): one line that any JSON reader accepts.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@attrs.frozen
class AgentEvent:
    """One journal entry, as the ``Event`` command carries it."""

    seq: int
    type: str
    kernel_id: Optional[str]
    data: dict
    ts: float

    def to_json(self) -> dict:
        """A JSON-compatible dict with the ``Event`` command's argument names."""
        return {
            "seq": self.seq,
            "type": self.type,
            "kernel_id": self.kernel_id,
            "data": self.data,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, value: Any) -> "AgentEvent":
        """
        The event from ``to_json()``'s dict, or from its JSON text (``str`` or ``bytes``).
        Raise ``ValueError`` when it is not one.
        """
        if isinstance(value, (bytes, str)):
            value = json.loads(value)  # JSONDecodeError is a ValueError
        if not isinstance(value, Mapping):
            raise ValueError(f"an event is a JSON object, not {type(value).__name__}")
        try:
            seq, type_, kernel_id, data, ts = (value[name] for name in ("seq", "type", "kernel_id", "data", "ts"))
        except KeyError as e:
            raise ValueError(f"event without {e.args[0]!r}") from None
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"bad event seq {seq!r}")
        if not isinstance(type_, str):
            raise ValueError(f"bad event type {type_!r}")
        if kernel_id is not None and not isinstance(kernel_id, str):
            raise ValueError(f"bad event kernel_id {kernel_id!r}")
        if not isinstance(data, dict):
            raise ValueError(f"bad event data {data!r}")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise ValueError(f"bad event ts {ts!r}")
        return cls(seq=seq, type=type_, kernel_id=kernel_id, data=data, ts=float(ts))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: str) -> None:
    # Makes an os.replace in ``directory`` itself durable.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes, fsync: bool) -> None:
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if fsync:
        _fsync_directory(os.path.dirname(os.path.abspath(path)))


class EventJournal:
    """
    The last ``keep`` events (at least) in memory and in the JSON-lines file ``path``.

    ``open()`` before use and ``close()`` after; listeners (``add_listener``) hear about every
    appended event, after it is on disk.
    """

    def __init__(self, path: str, clock: IReactorTime, keep: int = DEFAULT_KEEP, fsync: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep!r}")
        self.path = os.fspath(path)
        self.seq_path = self.path + ".seq"
        self._clock = clock
        self._keep = keep
        self._fsync = fsync
        # Consecutive seqs, oldest first, and the same events as their file lines.
        self._events: collections.deque[AgentEvent] = collections.deque(maxlen=keep)
        self._lines: collections.deque[bytes] = collections.deque(maxlen=keep)
        self._last_seq = 0
        self._fd: Optional[int] = None
        self._size = 0  # bytes in the file, all of them whole lines
        self._line_count = 0  # lines in the file, damaged ones included
        self._listeners: list[Callable[[AgentEvent], object]] = []

    @property
    def last_seq(self) -> int:
        """The seq of the newest event ever appended (0 when none)."""
        return self._last_seq

    @property
    def keep(self) -> int:
        return self._keep

    def __len__(self) -> int:
        return len(self._events)

    @property
    def file_bytes(self) -> int:
        """Bytes in the journal's file: each event adds a line, a compaction cuts it back to the kept ones."""
        return self._size

    # -- life cycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Load the file's tail, repair its end, and continue its seqs."""
        if self._fd is not None:
            raise RuntimeError(f"event journal {self.path} is already open")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            rewrite = self._load(fd)
            side_seq = self._read_side_seq()
            if side_seq > self._last_seq:
                if self._events:
                    log.warn(
                        "event journal {path} ends at seq {file_seq} but seq {side_seq} was "
                        "handed out; the events in between are lost",
                        path=self.path,
                        file_seq=self._last_seq,
                        side_seq=side_seq,
                    )
                self._events.clear()
                self._lines.clear()
                self._last_seq = side_seq
                rewrite = True
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            if rewrite or self._line_count > 2 * self._keep:
                self._compact()
            else:
                self._write_side_seq()
        except OSError:
            # The file is sound as it is; a failed rewrite only leaves it longer.
            log.failure("event journal {path}: could not rewrite the journal", path=self.path)
        log.info(
            "event journal {path} open: {count} events kept, last seq {last_seq}",
            path=self.path,
            count=len(self._events),
            last_seq=self._last_seq,
        )

    def close(self) -> None:
        """Close the file and record the last seq in the side file; closing twice is harmless."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        try:
            self._write_side_seq()
        except OSError:
            log.failure("event journal {path}: could not record the last seq", path=self.seq_path)

    # -- events -----------------------------------------------------------------------------

    def append(self, type: str, kernel_id: Optional[str] = None, data: Optional[Mapping] = None) -> AgentEvent:
        """
        Number the event, write it to disk, and tell the listeners. ``ValueError`` for an
        unknown type, a bad termination reason or data that is not a JSON object; an
        ``OSError`` from the disk leaves the journal as it was (the seq is not used).
        """
        if self._fd is None:
            raise RuntimeError(f"event journal {self.path} is not open")
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        if kernel_id is not None and not isinstance(kernel_id, str):
            raise ValueError(f"kernel_id must be a string or None, not {kernel_id!r}")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"event data must be a mapping, not {data!r}")
        if type == events.KERNEL_TERMINATED and data.get("reason") not in TERMINATION_REASONS:
            raise ValueError(f"unknown termination reason {data.get('reason')!r}")
        try:
            # Through JSON and back, so the event in memory is the one a reopen reads.
            copied = json.loads(_dumps(dict(data)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"event data is not JSON: {e}") from None

        event = AgentEvent(
            seq=self._last_seq + 1,
            type=type,
            kernel_id=kernel_id,
            data=copied,
            ts=float(self._clock.seconds()),
        )
        line = (_dumps(event.to_json()) + "\n").encode("ascii")
        try:
            _write_all(self._fd, line)
            if self._fsync:
                os.fsync(self._fd)
        except OSError:
            # A half-written line would glue itself to the next one: cut it off.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.failure("event journal {path}: could not cut off a failed write", path=self.path)
            raise
        self._size += len(line)
        self._line_count += 1
        self._last_seq = event.seq
        self._events.append(event)
        self._lines.append(line)

        if self._line_count > 2 * self._keep:
            try:
                self._compact()
            except OSError:
                # The event is safely appended; only the file's size suffers. Retry later
                # rather than on every append.
                log.failure("event journal {path}: compaction failed", path=self.path)
                self._line_count = self._keep

        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.failure(
                    "event journal listener {listener!r} failed on event {seq}",
                    listener=listener,
                    seq=event.seq,
                )
        return event

    def since(self, seq: int) -> list[AgentEvent]:
        """
        The kept events after ``seq``, oldest first; ``since(0)`` is every kept event.
        ``EventsExpired`` when events after ``seq`` are no longer kept.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidRequest(f"since must be a seq (an integer, 0 or more), not {seq!r}")
        first_seq = self._events[0].seq if self._events else self._last_seq + 1
        if seq == 0:
            return list(self._events)
        if seq >= self._last_seq:
            return []
        if seq < first_seq - 1:
            raise EventsExpired(f"events after seq {seq} are no longer kept; the oldest kept is {first_seq}")
        # Consecutive seqs: the event after ``seq`` sits at a known index.
        return list(itertools.islice(self._events, seq - first_seq + 1, None))

    def add_listener(self, listener: Callable[[AgentEvent], object]) -> None:
        """Call ``listener(event)`` after each append; its exceptions are logged."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[AgentEvent], object]) -> None:
        """Stop calling ``listener``; removing one that is not there is harmless."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    # -- disk -------------------------------------------------------------------------------

    def _load(self, fd: int) -> bool:
        """
        Read every line of the open file; keep the consecutive tail; cut off trailing damage.
        True when the file should be rewritten (it has a hole or a damaged line in it).
        """
        damaged_inside = False
        pending_damage = False  # damaged lines since the last good one
        good_end = 0  # offset after the last good line
        good_lines = 0  # lines up to good_end, damaged ones among them
        missing_newline = False
        line_number = 0
        offset = 0
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            for raw in f:
                line_number += 1
                offset += len(raw)
                try:
                    event = AgentEvent.from_json(raw)
                    if event.seq <= self._last_seq:
                        raise ValueError(f"seq {event.seq} after seq {self._last_seq}")
                except Exception as e:  # anything at all: a damaged line never stops the agent
                    pending_damage = True
                    log.warn(
                        "event journal {path}: skipped damaged line {line_number}: {error}",
                        path=self.path,
                        line_number=line_number,
                        error=str(e),
                    )
                    continue
                if event.seq != self._last_seq + 1 and self._events:
                    log.warn(
                        "event journal {path}: seqs {first} to {last} are missing; the events "
                        "before them are not replayed",
                        path=self.path,
                        first=self._last_seq + 1,
                        last=event.seq - 1,
                    )
                    self._events.clear()
                    self._lines.clear()
                    damaged_inside = True
                damaged_inside = damaged_inside or pending_damage
                pending_damage = False
                self._last_seq = event.seq
                self._events.append(event)
                self._lines.append((_dumps(event.to_json()) + "\n").encode("ascii"))
                good_end = offset
                good_lines = line_number
                missing_newline = not raw.endswith(b"\n")
        if offset > good_end:
            log.warn(
                "event journal {path}: cut off {count} damaged bytes at its end",
                path=self.path,
                count=offset - good_end,
            )
            os.ftruncate(fd, good_end)
        if missing_newline:
            # The last event was written whole but its newline was not.
            _write_all(fd, b"\n")
            good_end += 1
        self._size = good_end
        self._line_count = good_lines
        return damaged_inside

    def _compact(self) -> None:
        """Rewrite the file with the kept events only, atomically."""
        # The side file first: at any moment max(file, side file) covers every seq handed out.
        self._write_side_seq()
        data = b"".join(self._lines)
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        # From here on the old file is gone: appends must go to the new one.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        old_fd, self._fd = self._fd, fd
        if old_fd is not None:
            os.close(old_fd)
        self._size = len(data)
        self._line_count = len(self._lines)
        if self._fsync:
            _fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        log.debug("event journal {path} compacted to {count} events", path=self.path, count=self._line_count)

    def _read_side_seq(self) -> int:
        try:
            with open(self.seq_path, "rb") as f:
                text = f.read(64)
        except FileNotFoundError:
            return 0
        try:
            seq = int(text.strip())
            if seq < 0:
                raise ValueError(f"negative seq {seq}")
        except ValueError as e:
            log.warn("event journal {path}: ignored a damaged seq file: {error}", path=self.seq_path, error=str(e))
            return 0
        return seq

    def _write_side_seq(self) -> None:
        _write_atomically(self.seq_path, b"%d\n" % (self._last_seq,), self._fsync)
