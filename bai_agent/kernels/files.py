"""
Files in a kernel's home, served from the host side (``UploadFile``, ``DownloadFile``,
``ListFiles`` of PROTOCOL.md section 2).

The home ``{scratch_root}/{kernel_id}`` is mounted at ``/home/work`` in the kernel, so the
kernel user controls everything in it: it may plant symbolic links (to ``/``, to
``../..``), FIFOs, hard links, and swap a directory for a symbolic link at any moment. The
agent works on it as root, so the paths it is given are never resolved by name: the home is
opened once and every component is opened relative to its parent's descriptor
(``dir_fd=``) with ``O_NOFOLLOW``. A symbolic link anywhere on the path is refused
(``PathNotAllowed``), even one that stays inside the home and even one swapped in between
two steps, because there is no check-then-use: what was checked is the descriptor that is
used.

Decisions:

- Paths are relative; ``.`` and empty components are dropped, and any ``..`` component is
  refused, even one that would stay inside the home. Absolute paths, NUL bytes and paths
  of more than 4096 bytes are refused too; all of these are ``PathNotAllowed``.
- Only regular files are read or written. A directory is ``InvalidRequest`` ("is a
  directory"); a FIFO, socket or device node is ``PathNotAllowed`` ("is not a regular
  file"). The type is checked by ``lstat`` before opening (so no FIFO or device is ever
  opened on purpose) and again by ``fstat`` on the opened descriptor (so a swap between the
  two cannot pass); opens use ``O_NONBLOCK | O_NOCTTY`` so that even a swapped-in FIFO or
  terminal neither blocks nor attaches.
- Hard links: a path cannot tell a hard link from the file's own name. The kernel user can
  only link files it owns or may read and write (``fs.protected_hardlinks``), and inside
  the container only files on the same mount, so reading a file with several links is
  allowed. Writing is refused (``PathNotAllowed``) when the file has more than one link, so
  that an upload can never change a file that also lives outside the home.
- Uploads check the size cap before anything is written: an upload that would make the file
  larger than ``max_size`` is ``FileTooLarge`` and leaves the file as it was (an overwrite
  truncates only after the checks pass; a refused upload creates nothing). The cap
  bounds what uploads do: appends use ``O_APPEND``, so what the kernel itself writes
  meanwhile is kept and may take the file past the cap.
- Directories and files an upload creates belong to the kernel user (uid/gid 1000), with
  modes 0755 and 0644.
- A parent directory that vanishes while an upload writes (removed, or moved away and
  replaced, by the kernel) is made again, as a missing one is: the upload walks the path
  again, at most 4 times, then answers ``PathNotAllowed``; a symbolic link found there on
  the way is ``PathNotAllowed`` at once. Nothing is written before the file is open, so a
  walk again writes once. An upload never answers ``FileNotFound``, which ``UploadFile``
  does not declare: a missing home is ``InvalidRequest``.
- A download at or past the end of the file is not an error: it answers no data and
  ``eof`` true.
- A listing of more than 10,000 entries is refused (``InvalidRequest``) rather than cut:
  a partial listing would look complete. It stops reading the directory at that point.
- Every failure is a declared error; a full home (``ENOSPC``, ``EDQUOT``: the kernel's
  scratch grant is used up) is ``FileTooLarge``; another unexpected ``OSError``
  (``EACCES``, ``ENAMETOOLONG``, ...) becomes ``InvalidRequest`` with its message.

Every function here blocks on the disk: the agent runs them in its thread pool.
"""

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from bai_agent.kernels.workspace import KERNEL_GID, KERNEL_UID
from bai_agent.protocol.errors import (
    AgentError,
    FileNotFound,
    FileTooLarge,
    InvalidRequest,
    PathNotAllowed,
)

MAX_PATH_BYTES = 4096
MAX_CHUNK = 1 << 20
MAX_LIST_ENTRIES = 10_000
DIR_MODE = 0o755
FILE_MODE = 0o644

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the lstat neither blocks the thread on open nor on
# read; O_NOCTTY: a terminal never becomes the agent's controlling terminal.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MAX_OFFSET = (1 << 63) - 1
_CREATE_ATTEMPTS = 8
_UPLOAD_ATTEMPTS = 4


def resolve(home: str, path: str) -> list[str]:
    """
    The components of ``path`` under ``home``, after the path rules; ``[]`` is the home.

    Raises ``PathNotAllowed`` for an absolute path, a NUL byte, a ``..`` component or more
    than 4096 bytes, and ``InvalidRequest`` for a path that is not text.
    """
    if not isinstance(path, str):
        raise InvalidRequest(f"path must be a string, not {type(path).__name__}")
    if "\0" in path:
        raise PathNotAllowed("path contains a NUL byte")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidRequest("path is not valid text") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathNotAllowed(f"path is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise PathNotAllowed(f"{path!r} is absolute; paths are relative to /home/work")
    components = [name for name in path.split("/") if name not in ("", ".")]
    if ".." in components:
        raise PathNotAllowed(f"{path!r} has a '..' component")
    return components


def upload(home: str, path: str, data: bytes, append: bool, max_size: int) -> int:
    """
    Write ``data`` to the file at ``path`` (appending, or replacing its content), making
    missing parent directories; answer the file's size after the write.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequest("data must be bytes")
    data = bytes(data)
    if len(data) > MAX_CHUNK:
        raise InvalidRequest(f"data is {len(data)} bytes; at most {MAX_CHUNK} a call")
    if not isinstance(append, bool):
        raise InvalidRequest("append must be a boolean")
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 0:
        raise InvalidRequest("max_size must be a non-negative integer")
    components = resolve(home, path)
    if not components:
        raise InvalidRequest(f"{path!r} names no file: it is the home directory")
    # Whatever the file holds now, it cannot get smaller than the data; refusing here
    # creates and changes nothing.
    if len(data) > max_size:
        raise FileTooLarge(f"{_shown(components)} would be {len(data)} bytes; the cap is {max_size}")
    for _ in range(_UPLOAD_ATTEMPTS):
        try:
            with _os_errors(components):
                with _directory(home, components[:-1], create=True) as parent:
                    fd = _open_for_writing(parent, components, append)
                    try:
                        return _write(fd, components, data, append, max_size)
                    finally:
                        os.close(fd)
        except FileNotFound:
            # A parent directory vanished after it was opened or made (removed, or
            # moved away and perhaps replaced): nothing was written, so walk the path
            # again, making what is missing; a symlink put there is refused on the way.
            continue
    raise PathNotAllowed(
        f"{_shown(components[:-1])} was removed or replaced {_UPLOAD_ATTEMPTS} times while "
        f"{_shown(components)} was written; nothing was written"
    )


def download(home: str, path: str, offset: int, length: int) -> tuple[bytes, int, bool]:
    """
    Read at most ``length`` bytes at ``offset`` of the file at ``path``; answer
    ``(data, size of the whole file, eof)``, where ``eof`` says the data reaches the end.
    """
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= _MAX_OFFSET:
        raise InvalidRequest("offset must be a non-negative integer")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= MAX_CHUNK:
        raise InvalidRequest(f"length must be an integer from 1 to {MAX_CHUNK}")
    components = resolve(home, path)
    if not components:
        raise InvalidRequest(f"{path!r} is a directory")
    with _os_errors(components):
        with _directory(home, components[:-1], create=False) as parent:
            fd = _open_existing(parent, components, os.O_RDONLY)
            try:
                _check_regular(os.fstat(fd), components)
                data = _pread(fd, length, offset)
                # The size after the read, so that eof holds for the data answered even
                # when the file changed meanwhile.
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
    return data, size, offset + len(data) >= size


def list_files(home: str, path: str = ".") -> list[dict]:
    """
    The entries of the directory at ``path``, sorted by name: ``{name, type, size, mode,
    mtime}`` with ``type`` one of ``file``, ``dir``, ``link``, ``other``, as ``lstat`` sees
    them (a symbolic link is listed as a link, never followed).
    """
    components = resolve(home, path)
    with _os_errors(components):
        with _directory(home, components, create=False) as fd:
            entries: list[dict] = []
            with os.scandir(fd) as scan:
                for entry in scan:
                    if len(entries) == MAX_LIST_ENTRIES:
                        raise InvalidRequest(
                            f"{_shown(components)} has too many entries (more than "
                            f"{MAX_LIST_ENTRIES}); list a subdirectory"
                        )
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since it was read; it is not there any more
                    entries.append(_entry(entry.name, info))
    entries.sort(key=lambda entry: entry["name"])
    return entries


def _entry(name: str, info: os.stat_result) -> dict:
    if stat.S_ISREG(info.st_mode):
        kind = "file"
    elif stat.S_ISDIR(info.st_mode):
        kind = "dir"
    elif stat.S_ISLNK(info.st_mode):
        kind = "link"
    else:
        kind = "other"
    return {
        "name": name,
        "type": kind,
        "size": info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
        "mtime": info.st_mtime,
    }


def _shown(components: list[str]) -> str:
    return repr("/".join(components) or ".")


@contextlib.contextmanager
def _os_errors(components: list[str]) -> Iterator[None]:
    """Turn what the disk says into declared errors; declared ones pass as they are."""
    try:
        yield
    except AgentError:
        raise
    except FileNotFoundError:
        raise FileNotFound(f"{_shown(components)}: no such file or directory") from None
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            # Only writes meet it: the home holds what its scratch grant allows.
            raise FileTooLarge(f"{_shown(components)}: the kernel's home is full (its scratch grant)") from None
        raise InvalidRequest(f"{_shown(components)}: {error.strerror or error}") from None
    except (OverflowError, ValueError) as error:
        raise InvalidRequest(f"{_shown(components)}: {error}") from None


@contextlib.contextmanager
def _directory(home: str, components: list[str], create: bool) -> Iterator[int]:
    """
    A descriptor of the directory ``home/components``, reached without following any
    symbolic link; missing directories are made when ``create`` is true.
    """
    try:
        fd = os.open(home, _DIR_FLAGS)
    except FileNotFoundError:
        if create:  # an upload, which has no FileNotFound to answer
            raise InvalidRequest("the kernel's home directory is missing") from None
        raise FileNotFound("the kernel's home directory is missing") from None
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            raise PathNotAllowed("the kernel's home is not a directory") from None
        raise
    try:
        for index, name in enumerate(components):
            child = _open_child_directory(fd, name, components[: index + 1], create)
            fd, parent = child, fd
            os.close(parent)
        yield fd
    finally:
        os.close(fd)


def _open_child_directory(fd: int, name: str, components: list[str], create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFound(f"{_shown(components)}: no such directory") from None
    except OSError as error:
        raise _refusal(fd, name, components, error) from None
    try:
        os.mkdir(name, DIR_MODE, dir_fd=fd)
        created = True
    except FileExistsError:
        created = False  # made meanwhile (by the kernel, or a concurrent upload)
    try:
        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
    except OSError as error:
        raise _refusal(fd, name, components, error) from None
    if created:
        try:
            # On the descriptor, not the name: the name may point elsewhere by now.
            os.fchown(child, KERNEL_UID, KERNEL_GID)
            os.fchmod(child, DIR_MODE)
        except BaseException:
            os.close(child)
            raise
    return child


def _refusal(fd: int, name: str, components: list[str], error: OSError) -> Exception:
    """The declared error for a component that could not be opened as a directory."""
    if error.errno in (errno.ENOTDIR, errno.ELOOP):
        # O_DIRECTORY | O_NOFOLLOW answers ENOTDIR for a symbolic link as for a file; the
        # lstat only picks the message: the open refused either way.
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode) or error.errno == errno.ELOOP:
            return PathNotAllowed(f"{_shown(components)} is a symbolic link")
        if stat.S_ISDIR(mode):
            # A symbolic link when it was opened, swapped back since.
            return PathNotAllowed(f"{_shown(components)} changed while it was opened")
        return InvalidRequest(f"{_shown(components)} is not a directory")
    if error.errno == errno.ENOENT:
        return FileNotFound(f"{_shown(components)}: no such file or directory")
    return InvalidRequest(f"{_shown(components)}: {error.strerror or error}")


def _check_regular(info: os.stat_result, components: list[str]) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        raise InvalidRequest(f"{_shown(components)} is a directory")
    if stat.S_ISLNK(info.st_mode):
        raise PathNotAllowed(f"{_shown(components)} is a symbolic link")
    raise PathNotAllowed(f"{_shown(components)} is not a regular file")


def _open_existing(parent: int, components: list[str], flags: int) -> int:
    """Open the last component, which must be a regular file, never opening anything else."""
    name = components[-1]
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFound(f"{_shown(components)}: no such file") from None
    _check_regular(info, components)
    try:
        fd = os.open(name, flags | _FILE_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise FileNotFound(f"{_shown(components)}: no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PathNotAllowed(f"{_shown(components)} is a symbolic link") from None
        if error.errno == errno.EISDIR:
            raise InvalidRequest(f"{_shown(components)} is a directory") from None
        if error.errno in (errno.ENXIO, errno.ENODEV):
            # A FIFO without a reader, a socket, a device: swapped in after the lstat.
            raise PathNotAllowed(f"{_shown(components)} is not a regular file") from None
        raise
    return fd


def _open_for_writing(parent: int, components: list[str], append: bool) -> int:
    """
    A write descriptor of the last component: a new file made for the kernel user, or an
    existing regular file with no other hard link. Nothing is truncated here: an overwrite
    truncates only once the checks have passed.
    """
    name = components[-1]
    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
    for _ in range(_CREATE_ATTEMPTS):
        try:
            # O_EXCL: fails on any existing name, a dangling symbolic link included.
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, FILE_MODE, dir_fd=parent)
        except FileExistsError:
            pass
        else:
            try:
                os.fchown(fd, KERNEL_UID, KERNEL_GID)
                os.fchmod(fd, FILE_MODE)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            fd = _open_existing(parent, components, flags)
        except FileNotFound:
            continue  # removed between the two opens: create it after all
        try:
            info = os.fstat(fd)
            _check_regular(info, components)
            if info.st_nlink > 1:
                raise PathNotAllowed(
                    f"{_shown(components)} has {info.st_nlink} hard links; a file with other names is not written"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise InvalidRequest(f"{_shown(components)} keeps appearing and disappearing; try again")


def _write(fd: int, components: list[str], data: bytes, append: bool, max_size: int) -> int:
    current = os.fstat(fd).st_size if append else 0
    if current + len(data) > max_size:
        raise FileTooLarge(f"{_shown(components)} would be {current + len(data)} bytes; the cap is {max_size}")
    if not append:
        os.ftruncate(fd, 0)
    view = memoryview(data)
    while view:
        # O_APPEND for appends: what the kernel appends meanwhile is kept, never overwritten.
        view = view[os.write(fd, view) :]
    return os.fstat(fd).st_size


def _pread(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)
