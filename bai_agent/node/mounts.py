"""
Mounting and unmounting on the host, through the ``mount(2)`` and ``umount2(2)`` system
calls (the agent runs as root). Everything here blocks: call it through ``run_blocking``.

``bind_fd`` is what makes a checked path safe to hand to Docker: the caller opens the path
it checked (``O_PATH``, no symlink followed on any component) and binds *that open
directory* onto a private mount point; Docker then mounts the private point, so a symlink
swapped in for the original path later is never followed.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_MOVE = 8192
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _path(value: str | bytes | None) -> bytes | None:
    return os.fsencode(value) if value is not None else None


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """``mount(2)``; ``OSError`` with the errno on failure."""
    result = _libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target}: {os.strerror(code)}")


def bind_fd(fd: int, target: str, read_only: bool) -> None:
    """
    Bind the directory open as ``fd`` (an ``O_PATH`` fd will do) onto ``target``, a
    directory the agent made; read-only if asked (a bind mount takes ``MS_RDONLY`` only on
    a remount), never setuid or device files. The mount is private, so nothing mounted
    later below it propagates to or from the host.
    """
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    try:
        mount(None, target, None, MS_PRIVATE)
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        mount(None, target, None, flags)
    except OSError:
        unmount(target)
        raise


def move(source: str, target: str) -> None:
    """Move the mount at ``source`` to ``target`` (an existing directory): ``mount --move``."""
    mount(source, target, None, MS_MOVE)


def unmount(target: str, lazy: bool = False) -> bool:
    """
    Unmount ``target`` (never following a symlink there); ``True`` if something was
    unmounted, ``False`` if nothing was mounted there or it does not exist.
    """
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(_path(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(code, f"unmount {target}: {os.strerror(code)}")


class MountEntry(collections.namedtuple("MountEntry", "point fstype options")):
    """One line of ``/proc/self/mountinfo``: where, what filesystem, its mount and super options."""


def mount_table() -> list:
    """This process's mounts, in mount order (a later entry on the same point is on top)."""
    table = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            fields, tail = left.split(b" "), right.split(b" ")
            if len(fields) < 6 or len(tail) < 3:
                continue
            options = set(os.fsdecode(fields[5]).split(",")) | set(os.fsdecode(tail[2]).split(","))
            table.append(MountEntry(_unescape(fields[4]), os.fsdecode(tail[0]), frozenset(options)))
    return table


def mount_points_under(root: str) -> list:
    """Mount points at or below ``root``, deepest first."""
    root = os.path.realpath(root).rstrip("/") or "/"
    found = {entry.point for entry in mount_table() if entry.point == root or entry.point.startswith(root + "/")}
    return sorted(found, key=lambda point: point.count("/"), reverse=True)


def mount_containing(path: str) -> MountEntry | None:
    """The ``MountEntry`` of the filesystem ``path`` is on (the innermost, topmost); None if unknown."""
    real = os.path.realpath(path)
    best = None
    for entry in mount_table():
        if real == entry.point or real.startswith(entry.point.rstrip("/") + "/"):
            if best is None or len(entry.point) >= len(best.point):
                best = entry
    return best


def is_mount_point(path: str) -> bool:
    return os.path.realpath(path) in mount_points_under(path)


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))
