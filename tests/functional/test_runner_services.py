"""
Services in the runner, as a real process on the host (see ``test_runner_process.py``):
``start-service`` starts a program as the user and waits for its port, the runner
relays connections from the service's UNIX socket to that port, ``stop-service`` ends it.
"""

import os
import socket
import threading
import time

import pytest

from tests.functional.runner_process import USER_UID, Client, RunnerProcess

pytestmark = pytest.mark.functional

PYTHON = "/usr/bin/python3"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(runner):
    c = Client(runner.socket_path, timeout=40.0)
    yield c
    c.close()


def service_socket(runner, name="svc"):
    return os.path.join(runner.state_dir, f"{name}.sock")


def start(client, runner, name="svc", argv=None, port=None, **extra):
    message = {
        "type": "start-service",
        "name": name,
        "argv": argv,
        "env": extra.pop("env", {}),
        "port": port,
        "socket": extra.pop("socket", service_socket(runner, name)),
    }
    message.update(extra)
    client.send(message)


def wait_service(client, name="svc", kinds=("service-started", "service-failed", "service-exited", "error")):
    while True:
        message = client.recv()
        if message["type"] in kinds and message.get("name", name) == name:
            return message


def http_server(client, runner, name="svc"):
    port = free_port()
    start(client, runner, name, [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port)
    answer = wait_service(client, name)
    assert answer == {"type": "service-started", "name": name}, answer
    return port


ECHO = r"""
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
print("echo listening", flush=True)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.sendall(b"<bye>")
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

BLAST = r"""
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(8)
block = bytes(range(256)) * 4096
while True:
    conn, _ = listener.accept()
    if conn.recv(1) != b"g":
        conn.close()
        continue
    for _ in range(16):
        conn.sendall(block)
    conn.close()
"""


def python_service(client, runner, source, name="svc"):
    script = os.path.join(runner.home, f"{name}.py")
    with open(script, "w") as f:
        f.write(source)
    port = free_port()
    start(client, runner, name, [PYTHON, script, str(port)], port)
    answer = wait_service(client, name)
    assert answer == {"type": "service-started", "name": name}, answer
    return port


def connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    return sock


def read_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def http_get(path, target):
    with connect(path) as sock:
        sock.sendall(f"GET /{target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return read_all(sock)


# -- tests ----------------------------------------------------------------------------


def test_hello_lists_services(client):
    assert "services" in client.hello["features"]


def test_an_http_server_is_reached_through_the_socket(runner, client):
    with open(os.path.join(runner.home, "hello.txt"), "w") as f:
        f.write("hello from the home\n")
    port = http_server(client, runner)
    path = service_socket(runner)
    info = os.stat(path)
    assert oct(info.st_mode & 0o777) == oct(0o600)
    assert info.st_uid == os.geteuid()
    response = http_get(path, "hello.txt")
    assert response.startswith(b"HTTP/1.0 200"), response[:200]
    assert response.endswith(b"hello from the home\n")
    client.send({"type": "list-services", "id": 3})
    listing, _ = client.recv_type("services")
    assert listing["id"] == 3
    [entry] = listing["services"]
    assert (entry["name"], entry["status"], entry["port"]) == ("svc", "running", port)
    assert isinstance(entry["pid"], int)
    # it runs as the user, in its own session
    with open(f"/proc/{entry['pid']}/status") as f:
        uids = [line.split()[1] for line in f if line.startswith("Uid:")]
    assert uids == [str(USER_UID)]
    assert os.getsid(entry["pid"]) == entry["pid"]
    # a second start answers again
    start(client, runner, "svc", [PYTHON, "-c", "pass"], port)
    assert wait_service(client) == {"type": "service-started", "name": "svc"}


def test_twenty_concurrent_connections(runner, client):
    python_service(client, runner, ECHO)
    path = service_socket(runner)
    results = {}

    def talk(i):
        with connect(path) as sock:
            payload = f"message {i} ".encode() * 1000
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            results[i] = read_all(sock) == payload + b"<bye>"

    sockets = [threading.Thread(target=talk, args=(i,)) for i in range(20)]
    for thread in sockets:
        thread.start()
    for thread in sockets:
        thread.join(30)
    assert results == {i: True for i in range(20)}


def test_a_hundred_connections_open_at_once(runner, client):
    python_service(client, runner, ECHO)
    path = service_socket(runner)
    sockets = [connect(path) for _ in range(100)]
    try:
        for i, sock in enumerate(sockets):
            sock.sendall(f"<{i}>".encode())
        for i, sock in enumerate(sockets):
            expected = f"<{i}>".encode()
            got = b""
            while len(got) < len(expected):
                got += sock.recv(100)
            assert got == expected
        client.send({"type": "list-services"})
        listing, _ = client.recv_type("services")
        assert listing["services"][0]["connections"] == 100
    finally:
        for sock in sockets:
            sock.close()


def test_a_service_that_ends_on_its_own_is_reported(runner, client):
    python_service(client, runner, ECHO)
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    held = connect(service_socket(runner))
    os.kill(listing["services"][0]["pid"], 9)
    answer = wait_service(client)
    assert answer["type"] == "service-exited"
    assert answer["exit_code"] == 137
    assert "echo listening" in answer["output"]
    assert not os.path.exists(service_socket(runner))
    try:  # its connections are closed (reset, when the runner had not accepted it yet)
        assert read_all(held) == b""
    except ConnectionResetError:
        pass
    held.close()
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    assert (listing["services"][0]["status"], listing["services"][0]["pid"]) == ("exited", None)


def test_half_close_is_passed_on(runner, client):
    python_service(client, runner, ECHO)
    with connect(service_socket(runner)) as sock:
        sock.sendall(b"first ")
        assert sock.recv(100) == b"first "
        sock.sendall(b"second")
        sock.shutdown(socket.SHUT_WR)  # the echo server answers <bye> on EOF, then closes
        assert read_all(sock) == b"second<bye>"


def test_a_large_transfer_to_a_slow_reader_keeps_the_runner_small(runner, client):
    python_service(client, runner, BLAST)
    before = runner.peak_rss_kib()
    total = 0
    with connect(service_socket(runner)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.sendall(b"g")
        time.sleep(1.0)  # the service has written all it can by now
        assert runner.peak_rss_kib() - before < 8 * 1024
        expected = bytes(range(256)) * 4096 * 16
        received = bytearray()
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                break
            received += data
            total += len(data)
            if total < 4 * 1024 * 1024:
                time.sleep(0.002)  # slow at first
    assert total == 16 * 1024 * 1024
    assert received == expected
    assert runner.peak_rss_kib() - before < 8 * 1024


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_runner_idles_while_services_and_half_open_connections_wait(runner, client):
    python_service(client, runner, ECHO)
    path = service_socket(runner)
    idle = connect(path)
    half = connect(path)
    half.shutdown(socket.SHUT_WR)
    assert read_all(half) == b"<bye>"
    refused = connect(path)
    refused.close()
    time.sleep(0.3)
    before = cpu_seconds(runner.pid)
    time.sleep(2)
    assert cpu_seconds(runner.pid) - before < 0.2
    idle.sendall(b"still there")
    assert idle.recv(100) == b"still there"
    idle.close()
    half.close()


def test_stopping_a_starting_service_ends_it(runner, client):
    start(client, runner, "slow", [PYTHON, "-c", "import time; time.sleep(60)"], free_port())
    time.sleep(0.3)
    client.send({"type": "stop-service", "name": "slow"})
    answer = wait_service(client, "slow")
    assert (answer["type"], answer["exit_code"]) == ("service-exited", 128 + 15)


def test_a_shell_runtime_runner_has_services_too():
    process = RunnerProcess(runtime_type="shell")
    try:
        c = Client(process.socket_path)
        assert "services" in c.hello["features"]
        c.close()
    finally:
        process.stop()


def test_a_service_that_exits_at_once_fails_with_its_output(runner, client):
    start(client, runner, "quick", [PYTHON, "-c", "import sys; print('no luck here'); sys.exit(3)"], free_port())
    answer = wait_service(client, "quick")
    assert answer["type"] == "service-failed"
    assert "exit code 3" in answer["reason"]
    assert "no luck here" in answer["output"]
    assert not os.path.exists(service_socket(runner, "quick"))
    client.send({"type": "stop-service", "name": "quick"})  # stopping it again says so again
    again = wait_service(client, "quick")
    assert (again["type"], again["exit_code"]) == ("service-exited", 3)
    assert "no luck here" in again["output"]


def test_a_program_that_cannot_be_started_fails(runner, client):
    start(client, runner, "nope", ["/nonexistent/program"], free_port())
    answer = wait_service(client, "nope")
    assert answer["type"] == "service-failed"
    assert "cannot start" in answer["reason"] and "/nonexistent/program" in answer["reason"]


def test_a_service_that_never_listens_fails_after_its_timeout(runner, client):
    began = time.monotonic()
    start(
        client,
        runner,
        "mute",
        [PYTHON, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
        free_port(),
        timeout=1.5,
    )
    answer = wait_service(client, "mute")
    assert answer["type"] == "service-failed"
    assert "within 1.5 s" in answer["reason"]
    assert "waiting" in answer["output"]
    assert 1.4 < time.monotonic() - began < 10
    deadline = time.monotonic() + 10
    while runner.children() and time.monotonic() < deadline:  # only the interpreter is left
        client.send({"type": "list-services"})
        listing, _ = client.recv_type("services")
        if listing["services"][0]["pid"] is None:
            break
        time.sleep(0.1)
    assert listing["services"][0]["status"] == "failed"


def test_stop_service_ends_it(runner, client):
    port = http_server(client, runner)
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    pid = listing["services"][0]["pid"]
    client.send({"type": "stop-service", "name": "svc"})
    answer = wait_service(client)
    assert answer["type"] == "service-exited"
    assert answer["exit_code"] == 128 + 15  # http.server dies of SIGTERM
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert not os.path.exists(service_socket(runner))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # it can start again
    http_server(client, runner)


def test_stop_service_kills_a_service_that_ignores_sigterm(runner, client):
    source = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + ECHO
    python_service(client, runner, source)
    began = time.monotonic()
    client.send({"type": "stop-service", "name": "svc"})
    answer = wait_service(client)
    assert answer["type"] == "service-exited"
    assert answer["exit_code"] == 128 + 9
    assert 4.5 < time.monotonic() - began < 15


@pytest.mark.parametrize(
    "name, socket_path",
    [
        ("Bad", None),
        ("9lives", None),
        ("a" * 33, None),
        ("ok", "/tmp/ok.sock"),
        ("ok", "{state}/../ok.sock"),
        ("ok", "{state}/runner.sock"),
        ("ok", "relative.sock"),
        ("ok", "{state}/nodir/ok.sock"),
    ],
)
def test_bad_names_and_socket_paths_are_refused(runner, client, name, socket_path):
    extra = {}
    if socket_path is not None:
        extra["socket"] = socket_path.replace("{state}", runner.state_dir)
    start(client, runner, name, [PYTHON, "-c", "pass"], free_port(), **extra)
    answer = wait_service(client, name)
    assert answer["type"] == "error"
    assert answer["code"] == "BAD_REQUEST"
    assert answer["message"].startswith("start-service: ")
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    assert listing["services"] == []


@pytest.mark.parametrize(
    "change",
    [
        {"argv": []},
        {"argv": "python3"},
        {"argv": [PYTHON, 3]},
        {"env": {"A=B": "c"}},
        {"env": {"A": 1}},
        {"port": 0},
        {"port": 70000},
        {"port": True},
        {"port": "8080"},
        {"timeout": 0},
        {"timeout": 121},
        {"timeout": "5"},
        {"socket": None},
    ],
)
def test_bad_start_messages_are_refused(runner, client, change):
    message = {
        "type": "start-service",
        "name": "svc",
        "argv": [PYTHON, "-c", "pass"],
        "env": {},
        "port": free_port(),
        "socket": service_socket(runner),
    }
    message.update(change)
    client.send(message)
    answer = wait_service(client)
    assert (answer["type"], answer["code"], answer["name"]) == ("error", "BAD_REQUEST", "svc"), answer


def test_a_socket_path_too_long_for_a_unix_socket_is_refused(runner, client):
    path = os.path.join(runner.state_dir, "x" * (108 - len(runner.state_dir)) + ".sock")
    start(client, runner, "svc", [PYTHON, "-c", "pass"], free_port(), socket=path)
    answer = wait_service(client)
    assert (answer["type"], answer["code"]) == ("error", "BAD_REQUEST")
    assert "too long" in answer["message"]


def test_starting_a_service_that_is_stopping_is_a_conflict(runner, client):
    python_service(client, runner, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + ECHO)
    client.send({"type": "stop-service", "name": "svc"})
    start(client, runner, "svc", [PYTHON, "-c", "pass"], free_port())
    answer = wait_service(client)
    assert (answer["type"], answer["code"], answer["name"]) == ("error", "SERVICE_CONFLICT", "svc")
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    assert listing["services"][0]["status"] == "stopping"
    assert wait_service(client)["type"] == "service-exited"


def test_a_socket_in_a_directory_others_may_write_is_refused(runner, client):
    shared = os.path.join(runner.state_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    start(client, runner, "svc", [PYTHON, "-c", "pass"], free_port(), socket=os.path.join(shared, "svc.sock"))
    answer = wait_service(client)
    assert (answer["type"], answer["code"]) == ("error", "BAD_REQUEST")


def test_stopping_an_unknown_service_is_an_error(client):
    client.send({"type": "stop-service", "name": "nothing"})
    answer = client.recv()
    assert (answer["type"], answer["code"], answer["name"]) == ("error", "NO_SUCH_SERVICE", "nothing")


def test_user_code_cannot_reach_the_service_socket(runner, client):
    http_server(client, runner)
    path = service_socket(runner)
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r})\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    result = client.run(code)
    if os.geteuid() != 0:
        pytest.skip("user code runs as the test's own user: only root can tell them apart")
    assert result.stdout.startswith("refused"), result.stdout


def test_a_service_in_a_kernel_container_without_network(docker_host):
    from tests.functional.test_runner_container import KernelContainer

    kernel = KernelContainer(docker_host)
    try:
        kernel.start()
        kernel.wait_for_socket()
        c = Client(kernel.socket_path, timeout=40)
        assert "services" in c.hello["features"]
        with open(os.path.join(kernel.home, "echo.py"), "w") as f:
            f.write(ECHO)
        c.send(
            {
                "type": "start-service",
                "name": "echo",
                "argv": ["python3", "/home/work/echo.py", "8888"],
                "env": {"ECHO_MODE": "1"},
                "port": 8888,
                "socket": "/run/bai/echo.sock",
            }
        )
        answer = wait_service(c, "echo")
        assert answer == {"type": "service-started", "name": "echo"}, (answer, kernel.logs())
        host_path = os.path.join(kernel.state_dir, "echo.sock")
        assert os.stat(host_path).st_mode & 0o777 == 0o600
        with connect(host_path) as sock:
            sock.sendall(b"through the wall")
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b"through the wall<bye>"
        result = c.run(
            "import socket\n"
            "try:\n"
            "    socket.socket(socket.AF_UNIX).connect('/run/bai/echo.sock')\n"
            "    print('allowed')\n"
            "except PermissionError:\n"
            "    print('denied')\n"
        )
        assert result.stdout == "denied\n"
        c.send({"type": "stop-service", "name": "echo"})
        assert wait_service(c, "echo")["type"] == "service-exited"
        assert not os.path.exists(host_path)
        c.close()
    finally:
        kernel.remove()


def test_services_end_with_the_runner(runner, client):
    python_service(client, runner, ECHO)
    client.send({"type": "list-services"})
    listing, _ = client.recv_type("services")
    pid = listing["services"][0]["pid"]
    runner.process.terminate()
    runner.process.wait(15)
    assert not os.path.exists(service_socket(runner))
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # reparented, then reaped
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_new_agent_connection_gets_the_service_answers(runner):
    first = Client(runner.socket_path)
    start(
        first,
        runner,
        "late",
        [PYTHON, "-c", "import time; time.sleep(0.5); import http.server"],
        free_port(),
        timeout=1,
    )
    first.send({"type": "list-services"})  # the start is taken before the connection goes
    first.recv_type("services")
    first.close()
    second = Client(runner.socket_path, timeout=20)
    answer = wait_service(second, "late")
    assert answer["type"] == "service-failed"
    second.close()
