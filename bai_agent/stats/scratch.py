"""
The disk use of a kernel's scratch dir (its home), measured a little at a time.

A home may hold a million files; walking it at once would hold a worker thread for
seconds every sample. ``ScratchSizer.step`` walks for at most a budget of entries and
seconds and remembers where it stopped; the next call (the next sample) goes on from
there. ``bytes`` is the total of the last complete walk; until the first walk completes
it is the running total so far (``complete`` is False then), an underestimate that
only grows.

Sizes are what ``du`` counts: ``st_blocks * 512`` of every entry (directories and
symlinks themselves included, the root too), a file with several hard links once,
symlinks never followed. Entries that vanish or cannot be read mid-walk are skipped.
``step`` blocks on the disk: call it through ``run_blocking``.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
import time

DEFAULT_MAX_ENTRIES = 20_000
DEFAULT_MAX_SECONDS = 0.1


class ScratchSizer:
    """
    :param path: the directory to measure.
    :param max_entries: entries examined per ``step`` at most.
    :param max_seconds: seconds spent per ``step`` at most (checked every few entries).
    :param timer: a monotonic clock, for the time budget.
    """

    def __init__(
        self,
        path: str,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        timer=time.monotonic,
    ):
        if not isinstance(path, str) or not path:
            raise ValueError(f"invalid scratch path {path!r}")
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, not {max_seconds!r}")
        self.path = path
        self.max_entries = max_entries
        self.max_seconds = max_seconds
        self._timer = timer
        self._lock = threading.Lock()
        #: total of the last complete walk (running total before the first completes)
        self.bytes = 0
        #: whether ``bytes`` is a complete walk's total
        self.complete = False
        #: complete walks so far
        self.walks = 0
        self._walking = False
        self._closing = False
        self._start_walk()

    def __repr__(self):
        state = "complete" if self.complete else "partial"
        return f"<ScratchSizer {self.path} {self.bytes} bytes ({state})>"

    def _start_walk(self) -> None:
        self._total = 0
        self._seen_inodes: set = set()
        self._pending = collections.deque()
        self._entries = None  # the open scandir iterator of the directory being read
        self._walking = False

    def step(self) -> int:
        """
        Walk on for at most the budget; return ``bytes``. A concurrent call (another
        thread already stepping this sizer) returns ``bytes`` at once without walking.
        """
        if not self._lock.acquire(blocking=False):
            return self.bytes
        try:
            self._closing = False
            self._walk()
            if self._closing:  # closed by another thread meanwhile
                self._close_entries()
                self._start_walk()
            return self.bytes
        finally:
            self._lock.release()

    def close(self) -> None:
        """
        Release the open directory, if a walk is under way (the kernel ended). Never
        waits: when a step is running in another thread, that step closes it at its end.
        """
        self._closing = True
        if self._lock.acquire(blocking=False):
            try:
                self._close_entries()
                self._start_walk()
            finally:
                self._lock.release()

    def _walk(self) -> None:
        if not self._walking:
            self._walking = True
            self._total += self._root_size()
            self._pending.append(self.path)
        deadline = self._timer() + self.max_seconds
        budget = self.max_entries
        while budget > 0:
            if self._entries is None:
                if not self._pending:
                    self._finish()
                    return
                self._entries = self._open(self._pending.popleft())
                if self._entries is None:
                    continue
            try:
                entry = next(self._entries)
            except StopIteration:
                self._close_entries()
                continue
            except OSError:
                # The directory went away while being read: what was read counts.
                self._close_entries()
                continue
            budget -= 1
            self._count(entry)
            if budget % 256 == 0 and self._timer() >= deadline:
                break
        if not self.complete:
            self.bytes = self._total

    def _root_size(self) -> int:
        try:
            st = os.lstat(self.path)
        except OSError:
            return 0
        return st.st_blocks * 512

    def _open(self, path):
        try:
            return os.scandir(path)
        except OSError:  # vanished, not a directory any more, unreadable
            return None

    def _close_entries(self) -> None:
        if self._entries is not None:
            self._entries.close()
            self._entries = None

    def _count(self, entry) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return  # vanished since the directory was listed
        is_dir = stat.S_ISDIR(st.st_mode)
        if st.st_nlink > 1 and not is_dir:
            key = (st.st_dev, st.st_ino)
            if key in self._seen_inodes:
                return
            self._seen_inodes.add(key)
        self._total += st.st_blocks * 512
        if is_dir:
            self._pending.append(entry.path)

    def _finish(self) -> None:
        self.bytes = self._total
        self.complete = True
        self.walks += 1
        self._start_walk()
