"""
Starting user processes and reading their output, for the runner.

Every user process is started by :func:`spawn`: a fork, then in the child a new session
(so that the process group can be signalled as a whole), the standard fds, the user's
uid and gid (``setgroups([])`` first, so that root's supplementary groups do not
survive), the home directory as cwd, default signal dispositions, and exec. A failure
before exec comes back to the parent through a close-on-exec pipe and is raised there as
:class:`SpawnError`, so a bad runtime path is an error message, not a silent exit 127.

The runner is single-threaded, so forking and running Python in the child is safe.
"""

from __future__ import annotations

import codecs
import errno
import os
import signal

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Callable

#: The most read from one pipe at a time, and the largest output chunk in characters.
CHUNK = 64 * 1024

#: After a process has exited, at most this much is drained from each of its pipes
#: (what it wrote before dying is there; more can only come from a descendant).
DRAIN_LIMIT = 1024 * 1024


class SpawnError(Exception):
    """The process could not be started (the message says why)."""


class Identity:
    """Who user processes run as, and where."""

    def __init__(self, uid: int, gid: int, home: str, environ: dict) -> None:
        self.uid = uid
        self.gid = gid
        self.home = home
        self.environ = environ

    def check(self) -> None:
        """Fail early when the runner cannot switch to this identity."""
        if os.geteuid() != 0 and (os.getuid(), os.getgid()) != (self.uid, self.gid):
            raise SpawnError(
                f"the runner runs as uid {os.getuid()} and cannot run user code as uid {self.uid} gid {self.gid}"
            )


def _child_setup(identity, fds, pass_fds):
    """In the forked child, before exec. Any exception goes back to the parent."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    os.setsid()
    # dup2 makes inheritable copies; every other fd of the runner is close-on-exec
    # (Python's default), so exec leaves exactly 0, 1, 2 and pass_fds open.
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
        else:
            os.set_inheritable(fd, True)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    os.chdir(identity.home)


def spawn(
    argv: list,
    identity: Identity,
    stdin: int,
    stdout: int,
    stderr: int,
    pass_fds: tuple = (),
    environ: dict | None = None,
) -> int:
    """
    Start ``argv`` (``argv[0]`` an absolute path) as the user, in a new session, with
    fds 0, 1, 2 from ``stdin``, ``stdout``, ``stderr``. Return its pid (also its process
    group id). Raise :class:`SpawnError` when it cannot be started.
    """
    environ = identity.environ if environ is None else environ
    status_r, status_w = os.pipe()  # both close-on-exec: EOF means exec happened
    try:
        pid = os.fork()
    except OSError as e:
        os.close(status_r)
        os.close(status_w)
        raise SpawnError(f"cannot fork: {e}") from e
    if pid == 0:  # pragma: no cover - the child, measured by its behaviour in tests
        try:
            os.close(status_r)
            _child_setup(identity, (stdin, stdout, stderr), pass_fds)
            os.execve(argv[0], argv, environ)
        except BaseException as e:
            try:
                os.write(status_w, (f"{argv[0]}: {e}").encode("utf-8", "replace"))
            finally:
                os._exit(127)
        os._exit(127)
    os.close(status_w)
    report = b""
    try:
        while True:
            try:
                data = os.read(status_r, 4096)
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            if not data:
                break
            report += data
    finally:
        os.close(status_r)
    if report:
        _wait_quietly(pid)
        raise SpawnError(report.decode("utf-8", "replace"))
    return pid


def _wait_quietly(pid):
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255  # pragma: no cover - stopped processes are not reported (no WUNTRACED)


def describe_status(status: int) -> str:
    """Words for a wait status: 'exit code 3', 'signal 11 (SIGSEGV)'."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "?"
        return f"signal {signum} ({name})"
    return f"exit code {exit_code(status)}"


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False when it is already gone."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - only without CAP_KILL
        return False


def nonblocking_pipe() -> tuple:
    """A pipe whose read end is non-blocking (the runner's) and write end blocking (the user's)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


def open_devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY)


class OutputPipe:
    """
    The runner's read end of a user process's stdout or stderr: non-blocking, decoded as
    UTF-8 incrementally (a character split between two reads stays whole; invalid bytes
    become U+FFFD).
    """

    def __init__(self, fd: int, stream: str) -> None:
        self.fd = fd
        self.stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.closed = False

    def read(self, limit: int = CHUNK) -> tuple:
        """
        One non-blocking read: ``(text, size)`` where size is the number of bytes read,
        0 when nothing is there yet, or -1 at end of file (the pipe is then closed).
        """
        try:
            data = os.read(self.fd, limit)
        except (BlockingIOError, InterruptedError):
            return "", 0
        except OSError as e:  # pragma: no cover - EIO and friends: treat as the end
            if e.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self.close()
            return self._decoder.decode(b"", True), -1
        return self._decoder.decode(data), len(data)

    def drain(self, emit: Callable[[str, str], object], limit: int = DRAIN_LIMIT) -> None:
        """Read what is there now, up to ``limit`` bytes, passing text to ``emit(stream, text)``."""
        taken = 0
        while taken < limit and not self.closed:
            text, size = self.read(min(CHUNK, limit - taken))
            if text:
                emit(self.stream, text)
            if size <= 0:
                break
            taken += size

    def fault(self, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
