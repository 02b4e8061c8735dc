"""
Removing a directory tree that someone else filled: a kernel's home, where user code may
have made anything (a 100,000-deep chain of directories, millions of files, symlinks to
``/``, directories of mode 000, names that are not UTF-8), or a kernel's state dir, which
may still hold one of the agent's bind mounts of a host directory.

``shutil.rmtree`` recurses once per level (a 3,000-deep tree raises ``RecursionError``),
holds one descriptor per level, and empties whatever is mounted inside. ``remove_tree``:

- walks iteratively and fd-relative: every directory is opened relative to its parent's
  descriptor with ``O_DIRECTORY | O_NOFOLLOW``, every name unlinked with ``dir_fd``. A
  symlink is removed, never followed, even one swapped in for a directory mid-walk.
- never leaves the root's mount: a directory whose opened ``st_dev`` differs from the
  root's, or whose inode is not the one its parent lists and whose mount id differs from
  the root's (a bind mount from the same filesystem), is a mount point. It is reported and
  left as it is, never emptied; the directories above it stay too.
- holds a bounded number of descriptors: those of the deepest ``MAX_OPEN`` levels of the
  current path. A shallower level is reopened through ``..`` of the level below it and
  checked against the inode recorded on the way down; when it does not match (the tree
  was moved meanwhile) the walk starts again from the root, a bounded number of times.
- keeps bounded memory: one inode number per level of the current path (8 bytes), the
  names of the open levels, and a bounded set of what it could not remove.
- makes unreadable or unwritable directories (modes 000, 0500 made by their owner)
  ``0700`` and retries, through a descriptor, never by name. It matters to a remover
  without ``CAP_DAC_OVERRIDE``; root reads and writes them anyway.
- copes with a writer: a directory found non-empty again after it was emptied is walked
  again, at most ``MAX_REFILLS`` times, then reported.

What it cannot remove (an immutable file, a mount point, a directory that keeps filling)
is reported in the ``Removal`` it answers; it raises only when the root's parent cannot be
opened for a reason other than its absence. Everything here blocks on the disk: call it
through ``run_blocking``.
"""

from __future__ import annotations

import array
import errno
import os
import stat

import attrs

MAX_OPEN = 16
MAX_REFILLS = 8
MAX_RESTARTS = 64
MAX_REPORTED = 100
MAX_TRACKED = 100_000
_SWAP_TRIES = 4
_SHOWN = 5

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_EMPTY = (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY)
_NOT_A_DIRECTORY = (errno.ENOTDIR, errno.ELOOP)


@attrs.frozen
class Removal:
    """What ``remove_tree`` did: whether the root is gone, and what it had to leave."""

    path: str
    removed: bool
    #: directories found mounted inside, left mounted and untouched (at most MAX_REPORTED)
    mount_points: tuple[str, ...] = ()
    #: ``path: reason`` of what could not be removed (at most MAX_REPORTED)
    failures: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise ``TreeNotRemoved`` unless the root is gone."""
        if not self.removed:
            raise TreeNotRemoved(self)


class TreeNotRemoved(OSError):
    """A tree that ``remove_tree`` had to leave, at least in part."""

    def __init__(self, removal: Removal):
        self.removal = removal
        left = [f"mount point {point!r}" for point in removal.mount_points]
        left += [repr(failure) for failure in removal.failures]
        shown = "; ".join(left[:_SHOWN]) or "entries"
        if len(left) > _SHOWN:
            shown += f" and {len(left) - _SHOWN} more"
        super().__init__(errno.ENOTEMPTY, f"could not remove {removal.path!r}: left {shown}")


class _GiveUp(Exception):
    pass


def mount_id(fd: int) -> int | None:
    """The mount id of the open ``fd`` (from ``/proc/self/fdinfo``), or None if unknown."""
    try:
        info_fd = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.read(info_fd, 4096)
    except OSError:
        return None
    finally:
        os.close(info_fd)
    for line in info.splitlines():
        if line.startswith(b"mnt_id:"):
            try:
                return int(line.split(b":", 1)[1])
            except ValueError:
                return None
    return None


def remove_tree(path: str | bytes) -> Removal:
    """
    Remove ``path`` and everything below it, as described above; what is already gone is
    fine. ``path`` itself is not followed if it is a symlink: the symlink is removed.
    """
    path = os.fsdecode(path)
    parent_path, name = os.path.split(os.path.normpath(path))
    if name in ("", ".", ".."):
        raise ValueError(f"cannot remove {path!r}: name a directory below a parent")
    try:
        parent_fd = os.open(parent_path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Removal(path=path, removed=True)
    try:
        return _Remover(path, parent_fd, name).run()
    finally:
        os.close(parent_fd)


class _Frame:
    """An open directory of the current path."""

    __slots__ = ("fd", "ino", "entries", "child", "left", "made_writable")

    def __init__(self, fd: int, ino: int):
        self.fd = fd
        self.ino = ino
        self.entries: os._ScandirIterator[str] | None = None  # its open scandir iterator
        self.child: str | None = None  # the name of the subdirectory being emptied
        self.left = False  # something in it could not be removed
        self.made_writable = False

    def next_entry(self) -> os.DirEntry[str] | None:
        try:
            if self.entries is None:
                self.entries = os.scandir(self.fd)
            return next(self.entries)
        except StopIteration:
            pass
        except OSError:
            pass  # removed meanwhile, or unreadable: what is left is found by the caller
        self.close_entries()
        return None

    def close_entries(self) -> None:
        if self.entries is not None:
            self.entries.close()
            self.entries = None

    def close(self) -> None:
        self.close_entries()
        os.close(self.fd)


class _Remover:
    def __init__(self, path: str, parent_fd: int, name: str):
        self.path = path
        self.parent_fd = parent_fd
        self.name = name
        self.mount_points: list[str] = []
        self.failures: list[str] = []
        self.stuck: set = set()  # inode numbers of directories that keep something
        self.refills: dict = {}  # inode number -> times found filled again
        self.just_left: int | None = None  # the inode of the directory last emptied
        self.dev: int | None = None
        self.root_ino: int | None = None
        self.root_mount: int | None = None

    def run(self) -> Removal:
        removed = False
        try:
            root = self._open_root()
            if root is None:
                removed = True
            else:
                try:
                    removed = self._remove_root(root)
                finally:
                    os.close(root)
        except _GiveUp:
            pass
        return Removal(
            path=self.path,
            removed=removed,
            mount_points=tuple(self.mount_points),
            failures=tuple(self.failures),
        )

    def _open_root(self) -> int | None:
        try:
            return os.open(self.name, _DIR_FLAGS, dir_fd=self.parent_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in _NOT_A_DIRECTORY:
                self._unlink_root()
                return None
            if error.errno == errno.EACCES:
                fd = self._open_unreadable(self.parent_fd, self.name)
                if fd is not None:
                    return fd
            self._fail(self.parent_fd, self.name, error)
            raise _GiveUp() from None

    def _unlink_root(self) -> None:
        try:
            os.unlink(self.name, dir_fd=self.parent_fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            self._fail(self.parent_fd, self.name, error)
            raise _GiveUp() from None

    def _remove_root(self, root: int) -> bool:
        info = os.fstat(root)
        self.dev, self.root_ino = info.st_dev, info.st_ino
        self.root_mount = mount_id(root)
        for _ in range(MAX_REFILLS + 1):
            left = self._empty(root, info.st_ino)
            if left:
                return False
            try:
                os.rmdir(self.name, dir_fd=self.parent_fd)
                return True
            except FileNotFoundError:
                return True
            except OSError as error:
                if error.errno not in _NOT_EMPTY:
                    self._fail(self.parent_fd, self.name, error)
                    return False
            # Filled again since it was emptied: a writer is still at work.
        self._fail(self.parent_fd, self.name, "keeps being filled")
        return False

    def _empty(self, root: int, root_ino: int) -> bool:
        """Empty the root (whose inode is ``root_ino``) as far as possible; whether something had to be left in it."""
        frames = [_Frame(os.dup(root), root_ino)]  # the open levels, deepest last
        inos = array.array("Q", [root_ino])  # every level of the current path
        restarts = 0
        self.just_left = None
        try:
            while True:
                frame = frames[-1]
                entry = frame.next_entry()
                if entry is not None:
                    self._entry(frame, entry, frames, inos)
                    continue
                if len(inos) == 1:
                    return frame.left
                # This directory is as empty as it gets: back up, and remove it there.
                if frame.left:
                    self._stick(frame.ino)
                self.just_left = frame.ino
                if len(frames) > 1:
                    frames.pop().close()
                    inos.pop()
                    parent = frames[-1]
                    name, parent.child = parent.child, None
                    if name is not None:
                        self._directory(parent, name, frame.ino, frames, inos, 0)
                    continue
                up = self._up(frame.fd, inos[-2])
                frames.pop().close()
                inos.pop()
                if up is not None:
                    # Reopened: its listing starts again, and finds what was just emptied.
                    frames.append(_Frame(up, inos[-1]))
                    continue
                restarts += 1
                if restarts > MAX_RESTARTS:
                    self._fail(root, ".", "keeps being moved while it is removed")
                    return True
                del inos[1:]
                frames.append(_Frame(os.dup(root), root_ino))
        finally:
            for frame in frames:
                frame.close()

    def _entry(self, frame: _Frame, entry: os.DirEntry[str], frames: list[_Frame], inos: array.array[int]) -> None:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False  # the unlink tells
        if is_dir:
            self._directory(frame, entry.name, entry.inode(), frames, inos, 0)
        else:
            self._unlink(frame, entry.name, frames, inos, 0)

    def _unlink(self, frame: _Frame, name: str, frames: list[_Frame], inos: array.array[int], tries: int) -> None:
        while True:
            try:
                os.unlink(name, dir_fd=frame.fd)
                return
            except FileNotFoundError:
                return
            except IsADirectoryError:
                break  # a directory (swapped in since it was listed)
            except PermissionError as error:
                if error.errno == errno.EACCES and self._make_writable(frame):
                    continue
                if error.errno == errno.EPERM and self._is_directory(frame, name):
                    break
                self._leave(frame, name, error)
                return
            except OSError as error:
                if error.errno == errno.EBUSY:
                    self._mount_point(frame, name)  # something mounted on a file
                else:
                    self._leave(frame, name, error)
                return
        if tries >= _SWAP_TRIES:
            self._leave(frame, name, "keeps changing between file and directory")
            return
        try:
            ino = os.stat(name, dir_fd=frame.fd, follow_symlinks=False).st_ino
        except OSError:
            return  # gone meanwhile
        self._directory(frame, name, ino, frames, inos, tries + 1)

    def _directory(
        self, frame: _Frame, name: str, ino: int, frames: list[_Frame], inos: array.array[int], tries: int
    ) -> None:
        """Remove the subdirectory ``name``, or make it the current level to empty it."""
        if ino in self.stuck:
            frame.left = True
            return
        while True:
            try:
                os.rmdir(name, dir_fd=frame.fd)
                return
            except FileNotFoundError:
                return
            except NotADirectoryError:
                self._not_a_directory(frame, name, frames, inos, tries)
                return
            except PermissionError as error:
                if error.errno == errno.EACCES and self._make_writable(frame):
                    continue
                self._leave(frame, name, error)
                return
            except OSError as error:
                if error.errno in _NOT_EMPTY:
                    break
                self._leave(frame, name, error)
                return
        child = self._open_directory(frame, name, frames, inos, tries)
        if child is None:
            return
        try:
            info = os.fstat(child)
            mounted = info.st_dev != self.dev or (info.st_ino != ino and self._other_mount(child))
        except BaseException:
            os.close(child)
            raise
        if mounted:
            os.close(child)
            self._mount_point(frame, name)
            self._stick(ino)
            return
        if info.st_ino in self.stuck:  # listed under another inode number (overlayfs)
            os.close(child)
            frame.left = True
            return
        if info.st_ino == self.just_left:
            refills = self.refills.get(info.st_ino, 0) + 1
            if refills > MAX_REFILLS:
                os.close(child)
                self._stick(info.st_ino)
                self._leave(frame, name, "keeps being filled")
                return
            if len(self.refills) >= MAX_TRACKED:
                os.close(child)
                self._fail(frame.fd, name, "too many directories being filled")
                raise _GiveUp()
            self.refills[info.st_ino] = refills
        frame.child = name
        frames.append(_Frame(child, info.st_ino))
        inos.append(info.st_ino)
        if len(frames) > MAX_OPEN:
            frames.pop(0).close()  # reopened through '..' when the walk comes back up

    def _open_directory(
        self, frame: _Frame, name: str, frames: list[_Frame], inos: array.array[int], tries: int
    ) -> int | None:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=frame.fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in _NOT_A_DIRECTORY:
                self._not_a_directory(frame, name, frames, inos, tries)
                return None
            if error.errno == errno.EACCES:
                fd = self._open_unreadable(frame.fd, name)
                if fd is not None:
                    return fd
                if not self._is_directory(frame, name):
                    self._not_a_directory(frame, name, frames, inos, tries)
                    return None
            self._leave(frame, name, error)
            return None

    def _not_a_directory(
        self, frame: _Frame, name: str, frames: list[_Frame], inos: array.array[int], tries: int
    ) -> None:
        """A symlink or a file where a directory was: remove that, never follow it."""
        if tries >= _SWAP_TRIES:
            self._leave(frame, name, "keeps changing between file and directory")
        else:
            self._unlink(frame, name, frames, inos, tries + 1)

    def _open_unreadable(self, dir_fd: int, name: str) -> int | None:
        """
        A directory its owner made unreadable: an ``O_PATH`` descriptor (no permission
        needed, no symlink followed), made 0700 through ``/proc/self/fd`` and reopened
        there, so that the name is never resolved twice.
        """
        try:
            path_fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            info = os.fstat(path_fd)
            if not stat.S_ISDIR(info.st_mode) or (self.dev is not None and info.st_dev != self.dev):
                return None
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        finally:
            os.close(path_fd)
        if os.fstat(fd).st_ino != info.st_ino:
            os.close(fd)
            return None
        return fd

    def _make_writable(self, frame: _Frame) -> bool:
        """An unwritable directory (0500, say) made 0700, once; whether that was done."""
        if frame.made_writable:
            return False
        frame.made_writable = True
        try:
            os.fchmod(frame.fd, 0o700)
        except OSError:
            return False
        return True

    def _is_directory(self, frame: _Frame, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=frame.fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _other_mount(self, fd: int) -> bool:
        """Whether ``fd`` is on another mount than the root (if unknown: assume it is)."""
        found = mount_id(fd)
        return found is None or found != self.root_mount

    def _up(self, fd: int, expected_ino: int) -> int | None:
        """The parent of ``fd`` if it still is the directory the walk came down from."""
        try:
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None
        info = os.fstat(up)
        if info.st_dev != self.dev or info.st_ino != expected_ino:
            os.close(up)
            return None
        return up

    def _stick(self, ino: int) -> None:
        if len(self.stuck) >= MAX_TRACKED:
            self._fail(self.parent_fd, self.name, "too many entries that cannot be removed")
            raise _GiveUp()
        self.stuck.add(ino)

    def _mount_point(self, frame: _Frame, name: str) -> None:
        frame.left = True
        if len(self.mount_points) < MAX_REPORTED:
            where = self._where(frame.fd, name)
            if where not in self.mount_points:  # met again when a level is listed again
                self.mount_points.append(where)

    def _leave(self, frame: _Frame, name: str, reason: str | OSError) -> None:
        frame.left = True
        self._fail(frame.fd, name, reason)

    def _fail(self, dir_fd: int, name: str, reason: str | OSError) -> None:
        if len(self.failures) < MAX_REPORTED:
            if isinstance(reason, OSError):
                reason = reason.strerror or str(reason)
            failure = f"{self._where(dir_fd, name)}: {reason}"
            if failure not in self.failures:
                self.failures.append(failure)

    @staticmethod
    def _where(dir_fd: int, name: str) -> str:
        try:
            directory = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            directory = "?"
        return os.path.normpath(os.path.join(directory, name))
