"""
A kernel's services across restarts of the agent (docs/protocol.md section 7), on real
Docker with the data-science image and no kernel network: after kill -9 of the agent,
the next one relays Jupyter again on the same host port with the same URL, and one that
ended while no agent ran is reported stopped. And what the relay is asked to do by the
bytes it relays: nothing (it never connects anywhere but the kernel's socket).
"""

import hashlib
import json
import signal
import socket
import threading
import time
import urllib.request

import pytest
import pytest_twisted

from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import docker, running_agent
from tests.functional.test_rich_output_real import sci_image  # noqa: F401 (fixture)
from tests.functional.test_takeover_real import connect_when_listening

pytestmark = pytest.mark.functional

JUPYTER = {"timeout": 90}


def get(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    with running_agent(tmp_path, etcd_server.addr, "agent-services") as process:
        yield process


@pytest_twisted.inlineCallbacks
def connect(reactor, agent):
    secret = agent.secret_path.read_text().strip()
    client = yield connect_when_listening(reactor, agent, secret, time.monotonic() + 30)
    client.events = []
    client.set_event_handler(client.events.append)
    return client


@pytest_twisted.inlineCallbacks
def taken_over(reactor, client, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = yield client.get_agent_info()
            if not info["taking_over"]:
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the take-over did not finish"
        yield sleep(reactor, 0.2)


def kill_jupyter(container_id):
    """SIGKILL Jupyter inside the kernel, as an OOM or a user's kill would (the needle is built at run time)."""
    script = (
        "import os\n"
        "needle = 'jup' + 'yter'\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        if needle.encode() in open(f'/proc/{pid}/cmdline', 'rb').read(): os.kill(int(pid), 9)\n"
        "    except OSError: pass\n"
    )
    docker("exec", container_id, "python3", "-c", script)


@pytest_twisted.inlineCallbacks
def test_jupyter_keeps_its_port_and_url_across_kill_9_of_the_agent(agent, reactor, sci_image):  # noqa: F811
    client = yield connect(reactor, agent)
    kernel = yield client.create_kernel("svc", sci_image, {"cpu": 1, "mem": "1g"})
    yield client.execute("svc", "query", "x = 6 * 7")
    endpoint = yield client.start_service("svc", "jupyter", JUPYTER)
    port, token = endpoint["port"], endpoint["url"].split("token=")[1]
    status_url = f"http://127.0.0.1:{port}/api/status?token={token}"
    assert get(status_url)[0] == 200
    # 64 MB written by the kernel comes down through the relay, byte for byte.
    answer = yield client.execute(
        "svc",
        "query",
        "import hashlib, os\n"
        "data = os.urandom(64 << 20)\n"
        "open('big.bin', 'wb').write(data)\n"
        "print(hashlib.sha256(data).hexdigest())\n",
    )
    digest = answer["console"][0][1].strip()
    status, body = get(f"http://127.0.0.1:{port}/files/big.bin?token={token}", timeout=120)
    assert status == 200 and len(body) == 64 << 20 and hashlib.sha256(body).hexdigest() == digest
    del body
    client.close()

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert refused(port)  # the relay was the agent's: nothing listens until the next one
    agent.start()
    client = yield connect(reactor, agent)
    yield taken_over(reactor, client)
    # The same URL opens the same Jupyter, the manager gets the same endpoint again, and
    # the interpreter kept its state.
    assert get(status_url)[0] == 200
    assert (yield client.start_service("svc", "jupyter", JUPYTER)) == endpoint
    [listed] = yield client.list_services("svc")
    assert (listed["status"], listed["port"], listed["url"]) == ("running", port, endpoint["url"])
    answer = yield client.execute("svc", "query", "print(x)")
    assert answer["console"] == [["stdout", "42\n"]]
    # The page lists the service, without its token.
    page = agent.http("/")[1].decode()
    assert f"http://127.0.0.1:{port}/" in page and token not in page
    assert token not in agent.http("/status.json")[1].decode()
    client.close()

    # Jupyter dies while no agent runs: the next one says so, and its port is closed.
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    kill_jupyter(kernel["container_id"])
    agent.start()
    client = yield connect(reactor, agent)
    yield client.subscribe(0)
    yield taken_over(reactor, client)
    [listed] = yield client.list_services("svc")
    assert listed["status"] == "exited" and listed["port"] is None
    assert refused(port)
    deadline = time.monotonic() + 10
    while not [e for e in client.events if e["type"] == "service-stopped" and e["data"]["reason"] == "exited"]:
        assert time.monotonic() < deadline, client.events
        yield sleep(reactor, 0.1)
    # Started again, it gets a new port and a new token.
    again = yield client.start_service("svc", "jupyter", JUPYTER)
    assert again["port"] != port and again["url"] != endpoint["url"]
    assert get(f"http://127.0.0.1:{again['port']}/api/status?{again['url'].split('?')[1]}")[0] == 200
    yield client.destroy_kernel("svc")
    assert refused(again["port"])
    client.close()


class Honeypot:
    """A loopback TCP listener that counts who connects to it."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.listener.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.listener.close()


def exchange(port, data, timeout=30):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest_twisted.inlineCallbacks
def test_nothing_a_client_sends_makes_the_relay_connect_elsewhere(agent, reactor, sci_image):  # noqa: F811
    client = yield connect(reactor, agent)
    yield client.create_kernel("svc2", sci_image, {"cpu": 1, "mem": "1g"})
    endpoint = yield client.start_service("svc2", "jupyter", JUPYTER)
    port = endpoint["port"]
    honeypot = Honeypot()
    target = f"127.0.0.1:{honeypot.port}"
    try:
        attacks = [
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
            f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
            f"PROXY TCP4 127.0.0.1 127.0.0.1 40000 {honeypot.port}\r\nGET / HTTP/1.1\r\nHost: {target}\r\n\r\n",
            f"GET /api/status HTTP/1.1\r\nHost: {target}\r\nX-Forwarded-Host: {target}\r\n"
            f"Forwarded: for={target}\r\n\r\n",
            "\x05\x01\x00",  # a SOCKS5 greeting
        ]
        for attack in attacks:
            answer = exchange(port, attack.encode())
            # Whatever came back came from Jupyter (Tornado), or nothing did.
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
            assert b"TornadoServer" in answer or answer == b"" or b"HTTP/1.1 400" in answer, answer[:300]
        assert honeypot.accepted == 0
    finally:
        honeypot.close()
    # User code in the kernel cannot swap the service socket the relay connects to.
    answer = yield client.execute(
        "svc2",
        "query",
        "import os\n"
        "for action in (lambda: os.listdir('/run/bai'), lambda: os.unlink('/run/bai/service-jupyter.sock'),\n"
        "               lambda: os.symlink('/tmp/x', '/run/bai/service-jupyter.sock')):\n"
        "    try:\n"
        "        action(); print('allowed')\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n",
    )
    printed = "".join(text for _, text in answer["console"])
    assert printed.split() == ["PermissionError"] * 3, answer
    token = endpoint["url"].split("token=")[1]
    status, body = get(f"http://127.0.0.1:{port}/api/status?token={token}")
    assert status == 200 and "started" in json.loads(body)
    yield client.destroy_kernel("svc2")
    client.close()
