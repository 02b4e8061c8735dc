"""
The host directories a manager asked to mount into a kernel, pinned for Docker.

``spec.resolve_mounts`` checks a source when ``CreateKernel`` asks for it, but Docker
resolves a bind source path again at every container start: a directory of an allowed
root replaced by a symlink to any host directory would be followed then. So before each
container create (a ``CreateKernel``, a ``RestartKernel``), every source is checked again
and opened without following a symlink on any component (``open_source``), and the open
directory itself is bind-mounted onto a private pin point under the kernel's state
directory (``{state_dir}/kernels/{key}/mounts/{n}``, root-only). Docker is given the pin
point: what it mounts is what was checked. The pins are removed once the container has
started (the container keeps its own copy of each mount), and whatever a killed agent
left is unmounted when the kernel's directories are removed.

Everything here blocks on the disk: call it through ``run_blocking``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bai_agent.node import mounts as host_mounts
from bai_agent.protocol.errors import InvalidRequest

if TYPE_CHECKING:
    from bai_agent.kernels.spec import Mount

PIN_DIR = "mounts"


def open_source(source: str, allowed_roots: Iterable[str]) -> int:
    """
    An ``O_PATH`` fd of ``source`` (a real, absolute path), opened one component at a
    time from ``/`` without following a symlink; ``InvalidRequest`` if a component is (or
    has become) a symlink, if it is gone, or if it is no longer under an allowed root.
    """
    roots = [os.path.realpath(root).rstrip("/") for root in allowed_roots]
    if not any(source.startswith(root + "/") or source == root for root in roots if root):
        raise InvalidRequest(f"mount source {source} is not under an allowed mount root")
    parts = [part for part in source.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise InvalidRequest(f"mount source {source} is not a real path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for index, part in enumerate(parts):
            try:
                child = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise InvalidRequest(f"mount source {source} does not exist") from None
            except OSError as e:
                raise InvalidRequest(f"mount source {source} cannot be opened: {e.strerror}") from None
            os.close(fd)
            fd = child
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise InvalidRequest(f"mount source {source} has a symlink at {'/' + '/'.join(parts[: index + 1])}")
            last = index == len(parts) - 1
            if not stat.S_ISDIR(mode) and not (last and stat.S_ISREG(mode)):
                raise InvalidRequest(f"mount source {source} is not a directory or a regular file")
        return fd
    except BaseException:
        os.close(fd)
        raise


def pin(state_dir: str, mounts: Iterable[Mount], allowed_roots: Iterable[str]) -> list[str]:
    """
    Check and pin every mount of a kernel; the ``Binds`` entries for Docker, in order.
    On any failure, what was pinned is undone and the error raised.
    """
    pin_dir = os.path.join(state_dir, PIN_DIR)
    unpin(state_dir)
    binds = []
    try:
        if mounts:
            os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        for index, mount in enumerate(mounts):
            fd = open_source(mount.source, allowed_roots)
            try:
                point = os.path.join(pin_dir, str(index))
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.mkdir(point, 0o700)
                else:
                    os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                host_mounts.bind_fd(fd, point, mount.read_only)
            finally:
                os.close(fd)
            binds.append(f"{point}:{mount.target}:{'ro' if mount.read_only else 'rw'}")
    except BaseException:
        unpin(state_dir)
        raise
    return binds


def unpin(state_dir: str) -> None:
    """Unmount and remove every pin point of a kernel (what is not there is fine)."""
    pin_dir = os.path.join(state_dir, PIN_DIR)
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return
    for name in names:
        point = os.path.join(pin_dir, name)
        # Lazy: a pin still held open somewhere goes away once released, never lingers.
        while host_mounts.unmount(point, lazy=True):
            pass  # a point mounted twice (a killed agent's pin, then this one's)
        info = os.lstat(point)
        if stat.S_ISDIR(info.st_mode):
            os.rmdir(point)
        else:
            os.unlink(point)
    os.rmdir(pin_dir)
