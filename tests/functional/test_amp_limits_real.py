"""
The limits of PROTOCOL.md section 6 on a real agent process, attacked over raw TCP:

- a box that never ends is cut off at a few KiB before authentication and at the
  protocol's own limit after it, and the agent's memory does not grow;
- an unauthenticated connection that floods Hellos and never reads the answers costs
  the agent no memory either (it stops reading);
- a legitimate 1 MiB UploadFile and a 1 MiB Execute still work;
- an unauthenticated connection is closed after the authentication deadline, whatever
  it sends, and a thousand of them cannot keep a manager out (the agent runs with a hard
  limit of 1024 open files here, so only the cap on waiting connections can save it);
- the agent raises its soft open-file limit to the hard one;
- rotating the namespace secret in etcd closes the sessions authenticated with the old one.
"""

import base64
import errno
import json
import resource
import socket
import threading
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import sleep
from tests.functional.attacking import (
    agent_under_attack,
    answer_to,
    authenticate,
    connect,
    hello,
    open_file_limits,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    send_until_closed,
    unfinished_box,
)
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional

AGENT_ID = "agent-lim"
NAMESPACE = "limits"  # its own: the last test rotates the namespace secret
#: The agent's RLIMIT_NOFILE at start: it must raise the soft one to the hard one.
NOFILE = (512, 1024)
#: What each memory attack offers to send.
ATTACK_BYTES = 200 << 20
#: How much an attack may still get through before the agent's close reaches the
#: attacker: the loopback socket buffers of both ends, not the agent's memory.
IN_FLIGHT = 32 << 20
#: How much the agent's resident memory may grow during an attack ("a few MB").
MEMORY_SLACK = 4 << 20
MIB = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory, etcd_server, docker_host):
    with agent_under_attack(
        tmp_path_factory.mktemp("limits"), etcd_server.addr, AGENT_ID, NAMESPACE, nofile=NOFILE
    ) as process:
        # Once through the whole session path, so that what the agent builds lazily
        # for its first manager is not counted against an attack.
        with connect(process.amp_port) as sock:
            authenticate(sock, secret_of(process))
        yield process


def secret_of(agent) -> str:
    return agent.secret_path.read_text().strip()


def address(agent) -> str:
    return f"127.0.0.1:{agent.amp_port}"


class MemoryWatch:
    """The agent's RSS before an attack, and how much it grew: at its peak, and after."""

    def __init__(self, agent):
        self.pid = agent.process.pid
        self.before = rss_bytes(self.pid)
        reset_peak_rss(self.pid)

    def growth(self) -> tuple:
        return peak_rss_bytes(self.pid) - self.before, rss_bytes(self.pid) - self.before


def assert_memory_held(watch, what):
    peak, after = watch.growth()
    assert peak <= MEMORY_SLACK, f"{what}: the agent's memory grew by {peak / MIB:.1f} MiB at its peak"
    assert after <= MEMORY_SLACK, f"{what}: the agent kept {after / MIB:.1f} MiB after the connection closed"


# -- memory ------------------------------------------------------------------------------


def test_an_unfinished_box_before_authentication_is_cut_off_at_a_few_kib(agent):
    watch = MemoryWatch(agent)
    for _attempt in range(3):  # memory comes back: three attacks cost what one does
        with connect(agent.amp_port) as sock:
            sent, closed = send_until_closed(sock, unfinished_box(), ATTACK_BYTES)
        assert closed, f"the agent took {sent / MIB:.0f} MiB of one unfinished box and kept the connection"
        assert sent < IN_FLIGHT, f"the agent read {sent / MIB:.0f} MiB of one unfinished box"
    assert_memory_held(watch, "unauthenticated unfinished boxes")
    assert agent.process.poll() is None


def test_an_unfinished_box_after_authentication_is_cut_off_at_the_protocol_limit(agent):
    secret = secret_of(agent)
    watch = MemoryWatch(agent)
    for _attempt in range(3):
        with connect(agent.amp_port) as sock:
            authenticate(sock, secret)
            sent, closed = send_until_closed(sock, unfinished_box(), ATTACK_BYTES)
        assert closed, f"the agent took {sent / MIB:.0f} MiB of one unfinished box and kept the connection"
        assert sent < IN_FLIGHT, f"the agent read {sent / MIB:.0f} MiB of one unfinished box"
    assert_memory_held(watch, "authenticated unfinished boxes")
    assert agent.process.poll() is None


def test_a_hello_flood_whose_answers_are_never_read_costs_no_memory(agent):
    watch = MemoryWatch(agent)
    flood = hello(7) * 4096
    with connect(agent.amp_port, timeout=2.0) as sock:
        # For at most 3 s (the deadline closes it at 5 s): the agent must stop reading
        # once its answers pile up, so the sends block and time out.
        deadline = time.monotonic() + 3.0

        def chunks():
            while time.monotonic() < deadline:
                yield flood

        sent, closed = send_until_closed(sock, chunks(), ATTACK_BYTES)
    assert_memory_held(watch, f"a flood of {sent // len(hello(7))} Hellos never read")
    assert agent.process.poll() is None


@pytest_twisted.inlineCallbacks
def test_a_legitimate_mebibyte_upload_and_execute_still_work(agent, reactor):
    client = yield AgentClient.connect(reactor, address(agent), secret_of(agent))
    try:
        yield client.create_kernel("lim1", IMAGE, {"cpu": 0.5, "mem": "256m"})
        data = bytes(range(256)) * (MIB // 256)
        assert (yield client.upload_file("lim1", "big.bin", data))["size"] == MIB
        download = yield client.download_file("lim1", "big.bin", 0, MIB)
        assert download["data"] == data
        prefix = "print(sum(range(10)))\n#"
        code = prefix + "x" * (MIB - len(prefix) - 1) + "\n"
        assert len(code.encode()) == MIB
        console, answer = yield run_to_end(client, "lim1", "query", code)
        assert answer["status"] == "finished", answer
        assert text(console, "stdout") == "45\n"
    finally:
        yield client.reset()
        client.close()


# -- file descriptors ----------------------------------------------------------------------


def test_an_unauthenticated_connection_is_closed_at_the_deadline_whatever_it_sends(agent):
    answered = 0
    with connect(agent.amp_port) as sock:
        give_up = time.monotonic() + 15.0
        while time.monotonic() < give_up:
            try:
                sock.sendall(hello(answered + 1))
                answer_to(sock, str(answered + 1).encode())
            except (ConnectionError, socket.timeout):
                break
            answered += 1
            time.sleep(1.0)
        else:
            pytest.fail(f"an unauthenticated connection sending Hello every second stayed open ({answered} answers)")
    assert answered >= 1, "the agent closed the connection before answering a Hello"
    assert "did not authenticate within" in agent.log_text()


class Flood:
    """
    ``count`` raw sockets, each of which connects, says Hello every second, and connects
    again on the next round once the agent closed it; on a thread of its own, with plain
    non-blocking sockets (a connect the agent does not accept only waits in its backlog).
    """

    def __init__(self, port, count):
        self.port = port
        self.count = count
        self.sockets = [None] * count
        self.established = [False] * count
        self.connects = 0  # connections that got a Hello out
        self.closed_by_agent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        for sock in self.sockets:
            if sock is not None:
                sock.close()

    def _drop(self, index):
        self.sockets[index].close()
        self.sockets[index] = None
        if self.established[index]:
            self.closed_by_agent += 1
        self.established[index] = False

    def _run(self):
        message = hello(1)
        while not self._stop.is_set():
            for index in range(self.count):
                sock = self.sockets[index]
                if sock is None:
                    sock = self.sockets[index] = socket.socket()
                    sock.setblocking(False)
                    if sock.connect_ex(("127.0.0.1", self.port)) not in (0, errno.EINPROGRESS):
                        self._drop(index)
                    continue  # its first Hello goes on the next round
                try:
                    while True:  # drain what the agent sent; an empty read is its close
                        if not sock.recv(65536):
                            raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or self.established[index]:
                        self._drop(index)
                    continue
                try:
                    sock.send(message)
                except BlockingIOError:
                    continue  # still connecting, or the agent stopped reading
                except OSError:
                    self._drop(index)
                    continue
                if not self.established[index]:
                    self.established[index] = True
                    self.connects += 1
            self._stop.wait(1.0)


@pytest_twisted.inlineCallbacks
def test_a_thousand_waiting_sockets_cannot_keep_a_manager_out(agent, reactor):
    # This process holds the thousand sockets: its own soft limit may be too low for them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flood = Flood(agent.amp_port, 1000).start()
    lines_before = agent.log_text().count("\n")
    try:
        yield sleep(reactor, 1.5)
        for _attempt in range(3):
            d = AgentClient.connect(reactor, address(agent), secret_of(agent))
            d.addTimeout(15, reactor)
            client = yield d
            try:
                assert (yield client.ping("in")) == "in"
            finally:
                client.close()
            yield sleep(reactor, 1.5)
    finally:
        yield deferToThread(flood.stop)
    assert flood.connects >= 1000, f"the flood made only {flood.connects} connections"
    assert flood.closed_by_agent > 0
    # The agent logs what it closes, but not a line per connection of a flood.
    added = agent.log_text().count("\n") - lines_before
    assert added < 300, f"the flood made the agent log {added} lines"
    assert agent.process.poll() is None
    assert agent.http("/healthz")[0] == 200


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(agent):
    assert open_file_limits(agent.process.pid) == (NOFILE[1], NOFILE[1])


# -- secret rotation -------------------------------------------------------------------------


def etcd_put(etcd_url, key: str, value: str):
    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/put",
        data=json.dumps(
            {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


@pytest_twisted.inlineCallbacks
def test_rotating_the_secret_closes_the_sessions_of_the_old_one(agent, etcd_server, reactor):
    old = secret_of(agent)
    client = yield AgentClient.connect(reactor, address(agent), old)
    assert (yield client.ping("before")) == "before"
    new = "c0ffee" * 12
    yield deferToThread(etcd_put, etcd_server.url, f"/bai/{NAMESPACE}/config/agent/secret", new)
    closed = client.disconnected
    closed.addTimeout(10, reactor)
    yield closed
    # Managers come back with the new secret; the old one no longer opens a session.
    fresh = yield AgentClient.connect(reactor, address(agent), new)
    try:
        assert (yield fresh.ping("after")) == "after"
    finally:
        fresh.close()
    with pytest.raises(errors.AuthFailed):
        yield AgentClient.connect(reactor, address(agent), old)
    assert old not in agent.log_text() and new not in agent.log_text()
