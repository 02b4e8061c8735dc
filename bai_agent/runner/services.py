"""
Services: long-running applications (Jupyter, sshd, ...) inside the kernel, and the
in-container half of the agent's relay to them (wire messages: see ``server.py``).

A service is started as the user (``procs.spawn``: the user's uid and gid, a session of
its own, the home as cwd) with the kernel's environment plus its own ``env``; its stdout
and stderr go to one pipe whose last :data:`OUTPUT_TAIL` bytes are kept. The runner then
probes ``127.0.0.1:port`` with a non-blocking connect every :data:`PROBE_INTERVAL`
seconds; once something accepts there, it listens on the service's UNIX socket (mode
0600, owned by the runner, in the runner's own state directory, which user code cannot
enter) and relays every connection accepted there to a fresh TCP connection to the port:
non-blocking, in the poll loop, at most :data:`RELAY_BUFFER` bytes buffered per
direction (a side is not read while the other's buffer is full), a half-close passed on
as ``shutdown(SHUT_WR)``, and both sides closed when either fails.

Standard library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import time

import procs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any

#: The last this many bytes of a service's output are kept.
OUTPUT_TAIL = 64 * 1024
#: How often a starting service's port is probed, in seconds.
PROBE_INTERVAL = 0.1
#: How long a service may take to listen, by default and at most (seconds).
START_TIMEOUT = 30.0
MAX_START_TIMEOUT = 120.0
#: After SIGTERM, a service's process group gets SIGKILL this many seconds later.
STOP_GRACE = 5.0
#: Bytes buffered per direction of one relayed connection.
RELAY_BUFFER = 256 * 1024
#: The most read from a socket at a time.
RELAY_CHUNK = 64 * 1024
#: Relayed connections of one service at once; more wait in the listener's backlog.
MAX_CONNECTIONS = 256
#: After accept (or a relay's connect) ran out of file descriptors, the listener rests this long.
ACCEPT_PAUSE = 0.1
#: The longest name of a UNIX socket (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
MAX_NAME = 32

_NAME_FIRST = "abcdefghijklmnopqrstuvwxyz"
_NAME_REST = _NAME_FIRST + "0123456789-"


class ServiceError(Exception):
    """A ``start-service`` message is refused (the message says why)."""


def valid_name(name: object) -> bool:
    """``[a-z][a-z0-9-]{0,31}``, the whole string."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name[0] in _NAME_FIRST
        and all(c in _NAME_REST for c in name)
    )


def check_socket_path(path: object, state_dir: str, reserved: tuple) -> str:
    """
    ``path`` if it may be a service socket: absolute, normal, inside ``state_dir`` (the
    runner's state directory), in a real directory there that the runner owns and no one
    else may write, not one of ``reserved``, and not an existing file other than a socket.
    """
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ServiceError("socket must be an absolute path")
    if os.path.normpath(path) != path:
        raise ServiceError("socket must be a normal path (no '..', '.', '//' or trailing '/')")
    if len(os.fsencode(_temporary_name(path))) > MAX_SOCKET_PATH:
        raise ServiceError(f"socket path is too long (a UNIX socket's is at most {MAX_SOCKET_PATH} bytes)")
    state_dir = os.path.normpath(state_dir)
    if not path.startswith(state_dir.rstrip("/") + "/"):
        raise ServiceError(f"socket must lie in the runner's state directory {state_dir}")
    if path in reserved:
        raise ServiceError("socket names a file of the runner")
    parent = os.path.dirname(path)
    if os.path.realpath(parent) != os.path.realpath(state_dir) + parent[len(state_dir) :]:
        raise ServiceError("socket's directory is reached through a symbolic link")
    try:
        info = os.lstat(parent)
    except OSError as e:
        raise ServiceError(f"socket's directory: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ServiceError("socket's directory must be the runner's own, writable by no one else")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ServiceError(f"socket: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ServiceError("socket path exists and is not a socket")
    return path


def _temporary_name(path: str) -> str:
    """Where the socket is bound before it is renamed into place (it appears only when it listens)."""
    return f"{path}.{os.getpid()}.tmp"


def find_program(program: str, environ: dict) -> str:
    """``program`` as an absolute path: searched in the environment's PATH when it has no '/'."""
    if "/" in program:
        return program
    for directory in environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate if candidate.startswith("/") else os.path.abspath(candidate)
    return program  # the spawn then says it cannot be found


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


class Service:
    """One service: its process, its output tail, its listener and relayed connections."""

    def __init__(self, manager: Services, name: str, argv: list, env: dict, port: int, path: str, timeout: float):
        self.manager = manager
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.socket_path = path
        self.timeout = timeout
        self.status = "starting"  # then "running", "stopping", "exited" or "failed"
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.output = bytearray()
        self.out_fd: int | None = None
        self.deadline = 0.0
        self.next_probe = 0.0
        self.probe: Any = None  # a socket connecting to the port, while a probe is under way
        self.kill_at: float | None = None
        self.listener: Any = None
        self.relays: list = []
        self.accept_paused_until: float | None = None
        self.failed = False  # service-failed was sent

    # -- start and stop ------------------------------------------------------------

    def start(self) -> None:
        identity = self.manager.runner.identity
        environ = dict(identity.environ)
        environ.update(self.env)
        argv = [find_program(self.argv[0], environ)] + list(self.argv[1:])
        out_r, out_w = procs.nonblocking_pipe()
        devnull = procs.open_devnull()
        try:
            self.pid = procs.spawn(argv, identity, devnull, out_w, out_w, environ=environ)
        except procs.SpawnError as e:
            os.close(out_r)
            self.status = "failed"
            self._send_failed(f"cannot start: {e}")
            return
        finally:
            os.close(out_w)
            os.close(devnull)
        self.out_fd = out_r
        now = time.monotonic()
        self.deadline = now + self.timeout
        self.next_probe = now + PROBE_INTERVAL / 2
        self.manager.runner.watch_child(self.pid, self._exited)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after the grace time; ``service-exited`` follows."""
        if self.status in ("starting", "running"):
            self.status = "stopping"
            self._close_relay()
            if self.pid is not None:
                procs.signal_group(self.pid, signal.SIGTERM)
                self.kill_at = time.monotonic() + STOP_GRACE

    def kill(self) -> None:
        self._close_relay()
        if self.pid is not None:
            procs.signal_group(self.pid, signal.SIGKILL)

    def _exited(self, status: int) -> None:
        self._read_output(drain=True)
        self._close_output()
        pid, self.pid = self.pid, None
        if pid is not None:
            procs.signal_group(pid, signal.SIGKILL)  # what it left behind in its group
        self.exit_code = procs.exit_code(status)
        self._close_relay()
        was, self.status = self.status, ("failed" if self.failed or self.status == "starting" else "exited")
        if self.failed:
            return
        if was == "starting":
            self._send_failed(f"exited ({procs.describe_status(status)}) before it listened on port {self.port}")
        else:
            self.manager.runner.emit(
                {"type": "service-exited", "name": self.name, "exit_code": self.exit_code, "output": self.tail()}
            )

    def _send_failed(self, reason: str) -> None:
        self.failed = True
        self.manager.runner.emit({"type": "service-failed", "name": self.name, "reason": reason, "output": self.tail()})

    def tail(self) -> str:
        return bytes(self.output).decode("utf-8", "replace")

    # -- output ----------------------------------------------------------------------

    def _read_output(self, drain: bool = False) -> None:
        taken = 0
        while self.out_fd is not None:
            try:
                data = os.read(self.out_fd, procs.CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close_output()
                return
            self.output += data
            if len(self.output) > OUTPUT_TAIL:
                del self.output[: len(self.output) - OUTPUT_TAIL]
            taken += len(data)
            if not drain or taken >= procs.DRAIN_LIMIT:
                return

    def on_output(self) -> None:
        self._read_output()

    def _close_output(self) -> None:
        if self.out_fd is not None:
            os.close(self.out_fd)
            self.out_fd = None

    # -- waiting for the port ------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
        if self.status == "stopping" and self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            if self.pid is not None:
                procs.signal_group(self.pid, signal.SIGKILL)
        if self.status != "starting" or self.pid is None:
            return
        if now >= self.deadline:
            self._give_up(f"did not listen on port {self.port} within {self.timeout:g} s")
            return
        if self.probe is None and now >= self.next_probe:
            self.next_probe = now + PROBE_INTERVAL
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.setblocking(False)
            result = probe.connect_ex(("127.0.0.1", self.port))
            if result == 0:
                probe.close()
                self._listening()
            elif result in (errno.EINPROGRESS, errno.EAGAIN):
                self.probe = probe
            else:
                probe.close()

    def on_probe(self) -> None:
        probe, self.probe = self.probe, None
        result = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        probe.close()
        if result == 0 and self.status == "starting":
            self._listening()

    def _give_up(self, reason: str) -> None:
        self._read_output()
        self._close_probe()
        self.status = "failed"
        self._send_failed(reason)
        self.kill()

    def _close_probe(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def _listening(self) -> None:
        self._close_probe()
        path = self.socket_path
        temporary = _temporary_name(path)
        _remove_socket(temporary)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(temporary)
            finally:
                os.umask(old_umask)
            os.chmod(temporary, 0o600)
            listener.listen(128)
            listener.setblocking(False)
            os.rename(temporary, path)
        except OSError as e:
            listener.close()
            _remove_socket(temporary)
            self._give_up(f"cannot listen on {path}: {e}")
            return
        self.listener = listener
        self.status = "running"
        self.manager.runner.emit({"type": "service-started", "name": self.name})

    # -- the relay -----------------------------------------------------------------------

    def on_accept(self) -> None:
        for _ in range(16):
            if len(self.relays) >= MAX_CONNECTIONS:
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: the listener would stay readable
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            try:
                relay = Relay(self, sock)
            except OSError:
                sock.close()
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            if not relay.closed:
                self.relays.append(relay)

    def relay_closed(self, relay: Relay) -> None:
        try:
            self.relays.remove(relay)
        except ValueError:
            pass

    def _close_relay(self) -> None:
        self._close_probe()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            _remove_socket(self.socket_path)
        for relay in list(self.relays):
            relay.close()
        self.relays = []

    def fault(self, error: BaseException) -> None:
        self._close_probe()

    def interest(self, interest: dict) -> None:
        if self.out_fd is not None:
            interest[self.out_fd] = (self, self.on_output, None)
        if self.probe is not None:
            interest[self.probe.fileno()] = (self, None, self.on_probe)
        if self.listener is not None and self.accept_paused_until is None and len(self.relays) < MAX_CONNECTIONS:
            interest[self.listener.fileno()] = (self, self.on_accept, None)
        for relay in self.relays:
            relay.interest(interest)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "pid": self.pid,
            "status": self.status,
            "port": self.port,
            "socket": self.socket_path,
            "connections": len(self.relays),
            "exit_code": self.exit_code,
        }


class Relay:
    """One connection from the service socket (``client``) piped to the port (``upstream``)."""

    def __init__(self, service: Service, client: Any) -> None:
        self.service = service
        self.client = client
        client.setblocking(False)
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # OSError: the caller closes client
        self.upstream.setblocking(False)
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.client_eof = False  # the client sent EOF (or failed)
        self.upstream_eof = False
        self.client_shut = False  # EOF passed on to the client
        self.upstream_shut = False
        self.closed = False
        result = self.upstream.connect_ex(("127.0.0.1", service.port))
        self.connecting = result in (errno.EINPROGRESS, errno.EAGAIN)
        if result != 0 and not self.connecting:
            self.close()

    def interest(self, interest: dict) -> None:
        if self.closed:
            return
        on_read = self.read_client if not self.client_eof and len(self.to_upstream) < RELAY_BUFFER else None
        on_write = self.write_client if self.to_client else None
        if on_read or on_write:
            interest[self.client.fileno()] = (self, on_read, on_write)
        if self.connecting:
            interest[self.upstream.fileno()] = (self, None, self.on_connected)
            return
        on_read = self.read_upstream if not self.upstream_eof and len(self.to_client) < RELAY_BUFFER else None
        on_write = self.write_upstream if self.to_upstream else None
        if on_read or on_write:
            interest[self.upstream.fileno()] = (self, on_read, on_write)

    def on_connected(self) -> None:
        if self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
            self.close()
            return
        self.connecting = False
        self._pass_eof()

    def _read(self, sock: Any, buffer: bytearray) -> bool:
        """Read into ``buffer``; False at EOF. Errors close the relay (raised as OSError)."""
        try:
            data = sock.recv(min(RELAY_CHUNK, RELAY_BUFFER - len(buffer)))
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        buffer += data
        return True

    def _write(self, sock: Any, buffer: bytearray) -> None:
        try:
            sent = sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        del buffer[:sent]

    def read_client(self) -> None:
        self._guard(self._read_client)

    def _read_client(self):
        if not self._read(self.client, self.to_upstream):
            self.client_eof = True

    def read_upstream(self) -> None:
        self._guard(self._read_upstream)

    def _read_upstream(self):
        if not self._read(self.upstream, self.to_client):
            self.upstream_eof = True

    def write_client(self) -> None:
        self._guard(lambda: self._write(self.client, self.to_client))

    def write_upstream(self) -> None:
        self._guard(lambda: self._write(self.upstream, self.to_upstream))

    def _guard(self, action: Any) -> None:
        try:
            action()
        except OSError:
            self.close()
            return
        self._pass_eof()

    def _pass_eof(self) -> None:
        """Pass on an EOF once everything before it is written; close when both ways are done."""
        if self.closed or self.connecting:
            return
        try:
            if self.client_eof and not self.to_upstream and not self.upstream_shut:
                self.upstream_shut = True
                self.upstream.shutdown(socket.SHUT_WR)
            if self.upstream_eof and not self.to_client and not self.client_shut:
                self.client_shut = True
                self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if self.upstream_shut and self.client_shut:
            self.close()

    def fault(self, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()
            self.upstream.close()
            self.to_client = bytearray()
            self.to_upstream = bytearray()
            self.service.relay_closed(self)


class Services:
    """The runner's services by name (``runner`` is the ``server.Runner``)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.services: dict = {}
        self.state_dir = os.path.dirname(os.path.abspath(runner.options.socket))

    def start(self, message: dict) -> str | None:
        """
        Start the service ``message`` describes (``start-service``), or answer again for
        one that runs. None when accepted (its answer comes through the outbox), else why
        it is refused (prefixed by ``SERVICE_CONFLICT: `` when that is the error code,
        else the code is BAD_REQUEST).
        """
        name = message.get("name")
        if not valid_name(name):
            return "name must match [a-z][a-z0-9-]{0,31}"
        argv, env, port = message.get("argv"), message.get("env") or {}, message.get("port")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            return "argv must be a non-empty list of strings"
        if not argv[0]:
            return "argv[0] must not be empty"
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()
        ):
            return "env must be an object of strings"
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return "port must be an integer from 1 to 65535"
        timeout = message.get("timeout", START_TIMEOUT)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_START_TIMEOUT:
            return f"timeout must be a number of seconds, more than 0 and at most {MAX_START_TIMEOUT:g}"
        current = self.services.get(name)
        if current is not None and current.status in ("starting", "running"):
            if current.status == "running":
                self.runner.emit({"type": "service-started", "name": name})
            return None  # a starting one answers when it is up
        if current is not None and current.status == "stopping":
            return "SERVICE_CONFLICT: service is stopping"
        reserved = (os.path.abspath(self.runner.options.socket), getattr(self.runner.options, "environ_file", ""))
        try:
            path = check_socket_path(message.get("socket"), self.state_dir, reserved)
        except ServiceError as e:
            return str(e)
        for other in self.services.values():
            if other.socket_path == path and other.status in ("starting", "running", "stopping"):
                return f"socket {path} is service {other.name}'s"
        service = Service(self, str(name), argv, env, port, path, float(timeout))
        self.services[name] = service
        service.start()
        return None

    def stop(self, name: str) -> bool:
        """Stop ``name``; False when there is no such service."""
        service = self.services.get(name)
        if service is None:
            return False
        if service.status in ("starting", "running"):
            service.stop()
        elif service.status in ("exited", "failed"):  # said already; said again, for this stop
            self.runner.emit(
                {"type": "service-exited", "name": name, "exit_code": service.exit_code, "output": service.tail()}
            )
        # "stopping": service-exited follows
        return True

    def describe(self) -> list:
        return [service.describe() for service in self.services.values()]

    def interest(self, interest: dict) -> None:
        for service in self.services.values():
            service.interest(interest)

    def poll_ms(self) -> int | None:
        """The longest the poll loop may sleep for the services' timers, or None."""
        now = time.monotonic()
        wait = None
        for service in self.services.values():
            if service.status == "starting" and service.pid is not None:
                moment = min(service.deadline, service.next_probe)
            elif service.status == "stopping" and service.kill_at is not None:
                moment = service.kill_at
            elif service.accept_paused_until is not None:
                moment = service.accept_paused_until
            else:
                continue
            delay = max(0, int((moment - now) * 1000) + 1)
            wait = delay if wait is None else min(wait, delay)
        return wait

    def tick(self) -> None:
        now = time.monotonic()
        for service in list(self.services.values()):
            service.tick(now)

    def shutdown(self) -> None:
        for service in self.services.values():
            service.kill()
