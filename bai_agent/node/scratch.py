"""
How much of the disk a kernel's home may take (PROTOCOL.md section 6, "Disk").

A kernel gets ``scratch`` bytes (its grant); writes past them fail with ``ENOSPC``
inside the kernel and never fill the host's disk. ``--scratch-type`` chooses how:

- ``quota``: the scratch root's filesystem enforces it with a project quota (XFS mounted
  with ``prjquota``/``pquota``, or ext4 with the ``project`` feature and ``prjquota``):
  each home gets a project id and a hard block limit. Start-up fails when the scratch
  root cannot.
- ``hostfile``: each home is a filesystem of its own, an ext4 image of the grant's size
  (sparse: it takes only what is written) under ``{scratch_root}/.volumes/``, loop-mounted
  ``nosuid,nodev`` on the home. Needs root, loop devices and ``mkfs.ext4``.
- ``dir``: a plain directory, as before: nothing stops a kernel from filling the disk.
  An explicit choice, warned about at start.
- ``auto`` (the default): ``quota`` where the scratch root supports it, else ``hostfile``.

``ScratchVolumes`` is made once at start (``detect``), then ``limit(home, size)`` (of the
new, empty home the workspace made) and ``remove(home)`` run for each kernel; they block
on the disk (call them off the reactor).
A loop-mounted home outlives the agent: a restarted agent finds it mounted and adopts it
as it is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable
from typing import cast

from bai_agent.node import mounts
from bai_agent.values import SCRATCH_TYPES as KINDS

VOLUMES_DIR = ".volumes"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
KERNEL_UID = KERNEL_GID = 1000
# Project ids the agent gives homes: a hash of the home's name in a range of its own, so
# that ids an operator set up elsewhere on the filesystem (small numbers) are not taken.
PROJECT_ID_BASE = 0x40000000
COMMAND_TIMEOUT = 60

# <linux/fs.h>: struct fsxattr and its ioctls, to set a directory's project id.
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_PROJINHERIT = 0x00000200
_FSXATTR = struct.Struct("=IIIII8x")


class ScratchError(Exception):
    """A home's volume could not be made or removed; the message says why."""


def detect(scratch_root: str, kind: str, log: object = None) -> ScratchVolumes:
    """
    The volumes for ``kind`` on ``scratch_root``; ``ValueError`` (a start-up error) when
    the scratch root cannot do what ``kind`` asks.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scratch type {kind!r} (one of {', '.join(KINDS)})")
    quota_problem = quota_unsupported(scratch_root)
    if kind == "quota" and quota_problem:
        raise ValueError(f"--scratch-type quota: {quota_problem}")
    if kind == "auto":
        kind = "quota" if not quota_problem else "hostfile"
    if kind == "hostfile":
        problem = hostfile_unsupported()
        if problem:
            raise ValueError(f"--scratch-type {kind}: {problem} (use --scratch-type dir to run without disk limits)")
    return ScratchVolumes(scratch_root, kind)


def quota_unsupported(scratch_root: str) -> str | None:
    """Why project quotas cannot limit homes under ``scratch_root``; None when they can."""
    entry = mounts.mount_containing(scratch_root)
    if entry is None:
        return f"cannot find the filesystem of {scratch_root}"
    fstype, options = entry.fstype, entry.options
    if fstype == "xfs":
        if not {"prjquota", "pquota", "pqnoenforce"} & options:
            return f"the XFS filesystem of {scratch_root} is not mounted with prjquota"
        if "pqnoenforce" in options and not {"prjquota", "pquota"} & options:
            return f"the XFS filesystem of {scratch_root} does not enforce project quotas"
        if shutil.which("xfs_quota") is None:
            return "xfs_quota (xfsprogs) is not installed"
        return None
    if fstype == "ext4":
        if "prjquota" not in options:
            return f"the ext4 filesystem of {scratch_root} is not mounted with prjquota"
        if shutil.which("setquota") is None:
            return "setquota (quota) is not installed"
        return None
    return f"{scratch_root} is on {fstype}, which has no project quotas (XFS or ext4 have)"


def hostfile_unsupported() -> str | None:
    """Why loop-mounted images cannot be used here; None when they can."""
    if os.geteuid() != 0:
        return "loop-mounting a home needs root"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 (e2fsprogs) is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "this machine has no loop devices (/dev/loop-control)"
    return None


def capacity_of(scratch_root: str) -> int:
    """The size of the scratch root's filesystem, in bytes."""
    info = os.statvfs(scratch_root)
    return info.f_blocks * info.f_frsize


class ScratchVolumes:
    """Make and remove the size-limited homes of kernels under ``scratch_root``."""

    def __init__(self, scratch_root: str, kind: str):
        if kind not in ("quota", "hostfile", "dir"):
            raise ValueError(f"not a scratch type to use: {kind!r}")
        self.scratch_root = scratch_root
        self.kind = kind
        self.volumes_dir = os.path.join(scratch_root, VOLUMES_DIR)

    @property
    def enforced(self) -> bool:
        return self.kind != "dir"

    def image_path(self, home: str) -> str:
        key = hashlib.sha256(os.path.basename(home).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return os.path.join(self.volumes_dir, f"{key}.img")

    def limit(self, home: str, size: int) -> None:
        """Limit the new, empty directory ``home`` to ``size`` bytes; on failure undone, and raised."""
        try:
            if self.kind == "hostfile":
                self._make_image(home, size)
            elif self.kind == "quota":
                self._limit_project(home, size)
        except BaseException:
            self.remove(home)
            raise

    def remove(self, home: str) -> None:
        """
        Undo ``make`` but for the home directory itself: unmount it (lazily if something
        still holds it) and delete its image; the caller removes the directory. What is
        already gone is fine.
        """
        if self.kind == "hostfile" or mounts.is_mount_point(home):
            while mounts.is_mount_point(home):
                try:
                    mounts.unmount(home)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    mounts.unmount(home, lazy=True)
            try:
                os.unlink(self.image_path(home))
            except FileNotFoundError:
                pass
        # A project quota needs no undoing: the project's blocks go with its files.

    def move(self, old: str, new: str) -> None:
        """
        Move the home ``old`` to ``new`` (a warm kernel's claim: its container keeps the
        same directory). A directory is renamed; a mounted image is moved (``mount
        --move``, which leaves the container's own bind of it alone), with its image file.
        """
        if not (self.kind == "hostfile" and mounts.is_mount_point(old)):
            os.rename(old, new)
            return
        os.mkdir(new, 0o755)
        try:
            mounts.move(old, new)
        except BaseException:
            os.rmdir(new)
            raise
        os.rmdir(old)
        os.rename(self.image_path(old), self.image_path(new))

    def remove_images_except(self, homes: Iterable[str]) -> list[str]:
        """
        Delete the images of no home in ``homes`` (what a create killed before it mounted
        its image left); the paths deleted. An image still attached to a loop device
        lives on until that is detached.
        """
        keep = {self.image_path(home) for home in homes}
        try:
            names = os.listdir(self.volumes_dir)
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            path = os.path.join(self.volumes_dir, name)
            if path not in keep and name.endswith(".img"):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        return removed

    def used(self, home: str) -> int | None:
        """Bytes the home's own filesystem says are used (hostfile), else None."""
        if self.kind != "hostfile" or not mounts.is_mount_point(home):
            return None
        info = os.statvfs(home)
        return (info.f_blocks - info.f_bfree) * info.f_frsize

    # -- hostfile ------------------------------------------------------------------------

    def _make_image(self, home: str, size: int) -> None:
        os.makedirs(self.volumes_dir, mode=0o700, exist_ok=True)
        image = self.image_path(home)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: the image takes only what the kernel writes
        finally:
            os.close(fd)
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^resize_inode",
                "-E",
                f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={KERNEL_UID}:{KERNEL_GID}",
                image,
            ],
            "make the filesystem of",
            home,
        )
        _run(["mount", "-o", MOUNT_OPTIONS, image, home], "mount", home)
        try:
            os.rmdir(os.path.join(home, "lost+found"))  # the kernel's home starts empty
        except OSError:
            pass

    # -- quota ---------------------------------------------------------------------------

    def project_id(self, home: str) -> int:
        digest = hashlib.sha256(os.path.basename(home).encode("utf-8", "surrogateescape")).digest()
        return PROJECT_ID_BASE + int.from_bytes(digest[:4], "big") % PROJECT_ID_BASE

    def _limit_project(self, home: str, size: int) -> None:
        project = self.project_id(home)
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            attributes = bytearray(_FSXATTR.size)
            fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, attributes)
            xflags, extsize, nextents, _, cowextsize = _FSXATTR.unpack(attributes)
            new = _FSXATTR.pack(xflags | _FS_XFLAG_PROJINHERIT, extsize, nextents, project, cowextsize)
            fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, new)
        finally:
            os.close(fd)
        # detect chose quotas because this filesystem was found; were it gone from the
        # mount table since, the AttributeError below would say so (as it always has).
        filesystem = cast(mounts.MountEntry, mounts.mount_containing(self.scratch_root))
        kib = max(1, size // 1024)
        if filesystem.fstype == "xfs":
            _run(["xfs_quota", "-x", "-c", f"limit -p bhard={kib}k {project}", filesystem.point], "limit", home)
        else:
            _run(["setquota", "-P", str(project), "0", str(kib), "0", "0", filesystem.point], "limit", home)


def _run(argv: list[str], what: str, home: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ScratchError(f"could not {what} {home}: {e}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise ScratchError(f"could not {what} {home}: {message[-1] if message else f'exit {done.returncode}'}")
