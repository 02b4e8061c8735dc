"""
Attacking a real agent the way an attacker would: plain blocking sockets that write AMP
framing by hand, and readings of the agent process's memory and limits from ``/proc``.
For the real-agent tests of the connection limits (PROTOCOL.md section 6, "Limits").
"""

import contextlib
import socket
import struct

from bai_agent.protocol.auth import compute_mac
from tests.functional.agent_process import AgentProcess, containers_of, docker


def pair(key: bytes, value: bytes) -> bytes:
    """One AMP key/value pair on the wire."""
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


def box(items: dict) -> bytes:
    """A whole AMP box: its pairs, then the empty key that ends it."""
    return b"".join(pair(key, value) for key, value in items.items()) + b"\x00\x00"


def hello(tag: int = 1) -> bytes:
    return box({b"_command": b"Hello", b"_ask": str(tag).encode()})


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_box(sock: socket.socket) -> dict:
    """The next box the agent sends; ``ConnectionError`` when it closes first."""
    items = {}
    while True:
        (length,) = struct.unpack("!H", _read_exactly(sock, 2))
        if length == 0:
            return items
        key = _read_exactly(sock, length)
        (length,) = struct.unpack("!H", _read_exactly(sock, 2))
        items[key] = _read_exactly(sock, length)


def _read_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk
    return data


def answer_to(sock: socket.socket, tag: bytes) -> dict:
    """Read boxes until the answer (or error) to ``tag``; the agent's own Pings are answered."""
    while True:
        received = read_box(sock)
        if received.get(b"_command") == b"Ping" and b"_ask" in received:
            sock.sendall(box({b"_answer": received[b"_ask"], b"payload": received.get(b"payload", b"")}))
            continue
        if received.get(b"_answer", received.get(b"_error")) == tag:
            return received


def authenticate(sock: socket.socket, secret: str) -> None:
    """Say Hello and Authenticate over a raw socket."""
    sock.sendall(hello(1))
    nonce = answer_to(sock, b"1")[b"nonce"]
    sock.sendall(box({b"_command": b"Authenticate", b"_ask": b"2", b"mac": compute_mac(secret, nonce).encode()}))
    answer = answer_to(sock, b"2")
    assert b"_answer" in answer, f"authentication failed: {answer}"


def send_until_closed(sock: socket.socket, chunks, limit: int) -> tuple:
    """
    Write ``chunks()`` (an iterator of bytes) as fast as the socket takes them, up to
    ``limit`` bytes; ``(bytes sent, whether the agent closed the connection)``.
    """
    sent = 0
    try:
        for chunk in chunks:
            if sent >= limit:
                return sent, False
            sock.sendall(chunk)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError):
        return sent, True
    except socket.timeout:
        return sent, False  # the agent stopped reading but kept the connection
    return sent, False


def unfinished_box(value_size: int = 0xFFFF, pairs_per_chunk: int = 16):
    """Endless pairs with distinct keys and full-size values: a box that never ends."""
    value = b"v" * value_size
    index = 0
    while True:
        chunk = []
        for _ in range(pairs_per_chunk):
            chunk.append(pair(b"k%d" % index, value))
            index += 1
        yield b"".join(chunk)


# -- the agent process --------------------------------------------------------------------


def proc_status(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def rss_bytes(pid: int) -> int:
    """The process's resident memory now (VmRSS)."""
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory since the last ``reset_peak_rss`` (VmHWM)."""
    return int(proc_status(pid)["VmHWM"].split()[0]) * 1024


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+: ``5`` to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def open_file_limits(pid: int) -> tuple:
    """``(soft, hard)`` of RLIMIT_NOFILE, read from ``/proc/PID/limits``."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' line in /proc/{pid}/limits")


@contextlib.contextmanager
def agent_under_attack(tmp_path, etcd_addr, agent_id, namespace, nofile=None, extra=()):
    """
    Like ``running_agent``, in a namespace of its own (so that rotating its secret touches
    no other test's agent), started with ``nofile`` = ``(soft, hard)`` RLIMIT_NOFILE when
    given (through ``prlimit``, which execs the agent: its pid is the agent's).
    """
    process = AgentProcess(
        tmp_path, etcd_addr, namespace=namespace, agent_id=agent_id, extra=["--kernel-network", "none", *extra]
    )
    if nofile is not None:
        process.argv = ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", "--", *process.argv]
    process.start()
    try:
        process.wait_for(lambda: process.http("/healthz")[0] == 200, 20, "/healthz 200")
        yield process
    finally:
        process.stop()
        for container in containers_of(agent_id):
            docker("rm", "-f", container, check=False)
        process.remove_state()
