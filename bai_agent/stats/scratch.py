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

The home is user code's, and user code runs while the agent (root) walks it: a directory
queued for the next step may be replaced by a symlink to ``/`` meanwhile. So the walk
never opens a path: each directory is opened from its parent's fd with ``O_NOFOLLOW``
and must be the inode that was listed (device and inode), and the walk never leaves the
home's filesystem. A queued directory is remembered as (its parent, its name, the inode
listed), and a few recently opened directories are kept open, so that reaching one is a
single ``openat`` in the usual breadth-first order.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
import time
from collections.abc import Callable

DEFAULT_MAX_ENTRIES = 20_000
DEFAULT_MAX_SECONDS = 0.1
#: Directories kept open between openings (parents of what is queued next).
OPEN_DIRECTORIES = 32

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Directory:
    """A directory queued for the walk: its parent (None for the home), name and inode."""

    __slots__ = ("parent", "name", "dev", "ino")  # hashed by identity: cheap at any depth

    def __init__(self, parent: _Directory | None, name: str, dev: int, ino: int) -> None:
        self.parent, self.name, self.dev, self.ino = parent, name, dev, ino


#: The home itself, as the parent of its entries.
_ROOT = None


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
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
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
        # _Directory -> fd, most recent last
        self._open_fds: collections.OrderedDict[_Directory, int] = collections.OrderedDict()
        self._root_fd: int | None = None  # the home, open for the walk under way
        self._entries_fd: int | None = None
        self._start_walk()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"<ScratchSizer {self.path} {self.bytes} bytes ({state})>"

    def _start_walk(self) -> None:
        self._close_directories()
        self._total = 0
        self._seen_inodes: set[tuple[int, int]] = set()
        self._pending: collections.deque[_Directory | None] = collections.deque()
        # the open scandir iterator of the directory being read
        self._entries: os._ScandirIterator[str] | None = None
        self._entries_fd = None  # the fd it reads, owned until it is closed
        self._current: _Directory | None = None  # and that directory (a _Directory, or _ROOT)
        self._device: int | None = None
        self._walking = False

    def _close_directories(self) -> None:
        for fd in self._open_fds.values():
            os.close(fd)
        if self._root_fd is not None:
            os.close(self._root_fd)
        self._open_fds = collections.OrderedDict()
        self._root_fd = None

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
            self._total += self._open_root()
            if self._root_fd is not None:
                self._pending.append(_ROOT)
        deadline = self._timer() + self.max_seconds
        budget = self.max_entries
        while budget > 0:
            if self._entries is None:
                if not self._pending:
                    self._finish()
                    return
                self._current = self._pending.popleft()
                self._entries = self._open(self._current)
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
        # Between steps a sizer holds the home and the directory being read, no more (a
        # hundred kernels' sizers would otherwise hold thousands of fds).
        while self._open_fds:
            os.close(self._open_fds.popitem()[1])

    def _open_root(self) -> int:
        """Open the home for this walk (never through a symlink); its own size."""
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except OSError:
            return 0
        st = os.fstat(fd)
        self._root_fd, self._device = fd, st.st_dev
        return st.st_blocks * 512

    def _open(self, directory: _Directory | None) -> os._ScandirIterator[str] | None:
        """A scandir iterator of a queued directory, if it is still the one that was listed."""
        fd = self._directory_fd(directory)
        if fd is None:
            return None
        # The entries stat through the fd they were listed from (fstatat): it must stay
        # open, and be this directory, until the listing is closed.
        self._entries_fd = os.dup(fd)
        try:
            return os.scandir(self._entries_fd)
        except OSError:  # unreadable
            os.close(self._entries_fd)
            self._entries_fd = None
            return None

    def _directory_fd(self, directory: _Directory | None) -> int | None:
        # Go up to the nearest directory that is open, then down, one openat a level.
        chain: list[_Directory] = []
        while directory is not _ROOT and directory not in self._open_fds:
            chain.append(directory)
            directory = directory.parent
        if directory is _ROOT:
            fd = self._root_fd
        else:
            fd = self._open_fds[directory]
            self._open_fds.move_to_end(directory)
        for child in reversed(chain):
            try:
                child_fd = os.open(child.name, _DIR_FLAGS, dir_fd=fd)
            except OSError:  # vanished, or replaced by a symlink or a file
                return None
            st = os.fstat(child_fd)
            if (st.st_dev, st.st_ino) != (child.dev, child.ino):
                os.close(child_fd)  # replaced by another directory: not what was listed
                return None
            self._open_fds[child] = fd = child_fd
            while len(self._open_fds) > OPEN_DIRECTORIES:
                os.close(self._open_fds.popitem(last=False)[1])
        return fd

    def _close_entries(self) -> None:
        if self._entries is not None:
            self._entries.close()
            self._entries = None
        if self._entries_fd is not None:
            os.close(self._entries_fd)
            self._entries_fd = None

    def _count(self, entry: os.DirEntry[str]) -> None:
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
        if is_dir and st.st_dev == self._device:
            self._pending.append(_Directory(self._current, entry.name, st.st_dev, st.st_ino))

    def _finish(self) -> None:
        self.bytes = self._total
        self.complete = True
        self.walks += 1
        self._start_walk()
