"""
The status page against slowloris on a real agent: clients that send a request header
line every second and never finish their headers are closed after the header timeout,
and the page keeps answering everyone else meanwhile.
"""

import socket
import time

import pytest

from tests.functional.agent_process import running_agent

pytestmark = pytest.mark.functional

SLOW_CLIENTS = 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory, etcd_server, docker_host):
    with running_agent(tmp_path_factory.mktemp("slowloris"), etcd_server.addr, "agent-sl") as process:
        yield process


def test_slowloris_clients_are_closed_after_the_header_timeout(agent):
    clients = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", agent.http_port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        clients.append(sock)
    closed = set()
    line = 0
    give_up = time.monotonic() + 30.0
    while len(closed) < len(clients) and time.monotonic() < give_up:
        line += 1
        for index, sock in enumerate(clients):
            if index in closed:
                continue
            try:
                sock.sendall(b"X-Slow-%d: still typing\r\n" % line)
                sock.setblocking(False)
                try:
                    if sock.recv(65536) == b"":
                        closed.add(index)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:  # reset, or a pipe the agent closed
                closed.add(index)
        if line % 3 == 0:
            # Everyone else is still served while the slow clients hold their sockets.
            status, body = agent.http("/healthz")
            assert status == 200, body
        time.sleep(1.0)
    for sock in clients:
        sock.close()
    assert len(closed) == len(clients), (
        f"{len(clients) - len(closed)} of {len(clients)} clients sending a header line a second "
        f"were still connected after {line} lines"
    )
    assert agent.process.poll() is None
    assert agent.http("/healthz")[0] == 200
