"""
Fixtures for functional tests: a real etcd server per test session, the real Docker
daemon, and an agent with a client for the tests of Execute and files. A missing component
fails the test with a clear message; nothing is skipped.
"""

import os
import shutil
import subprocess
import tempfile

import pytest
import pytest_twisted
from twisted.web.server import Site

from bai_agent.protocol.client import AgentClient
from bai_agent.testing.docker_host import require_docker
from bai_agent.testing.etcd_server import EtcdServer
from bai_agent.testing.standin_docker import StandInDaemon
from tests.functional.agent_process import docker, running_agent
from tests.functional.executing import IMAGE, SHELL_IMAGE
from tests.functional.runner_process import RunnerProcess


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """A real etcd on free loopback ports with a temporary data dir."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_host():
    """The DOCKER_HOST-style address of a running Docker daemon (fails if none)."""
    return require_docker()


@pytest.fixture(scope="module")
def agent(tmp_path_factory, etcd_server, docker_host):
    """
    A real agent for running code and moving files (uploads capped at 5 MiB), with the
    shell-runtime image built for it. Modules that need another agent define their own.
    """
    build = subprocess.run(
        ["docker", "build", "-q", "-t", SHELL_IMAGE, "-"],
        input=f"FROM {IMAGE}\nLABEL ai.backend.runtime-type=shell\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    with running_agent(
        tmp_path_factory.mktemp("exec"), etcd_server.addr, "agent-x", ["--max-upload-size", "5m"]
    ) as process:
        yield process
    docker("rmi", "-f", SHELL_IMAGE, check=False)


@pytest.fixture
def client(agent, reactor):
    """An authenticated client of ``agent``; its kernels are reset afterwards."""
    secret = agent.secret_path.read_text().strip()
    client = pytest_twisted.blockon(AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret))
    yield client
    pytest_twisted.blockon(client.reset())
    client.close()


@pytest.fixture
def socket_dir():
    """A fresh directory for UNIX sockets, short enough for their ~107-byte paths."""
    path = tempfile.mkdtemp(prefix="bai-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def daemon(reactor, socket_dir):
    """A ``StandInDaemon`` (the Docker Engine API, scripted) listening on ``socket_dir``/d.sock."""
    resource = StandInDaemon(reactor)
    port = reactor.listenUNIX(os.path.join(socket_dir, "d.sock"), Site(resource))
    yield resource
    await port.stopListening()


@pytest.fixture
def runner():
    """The runner as a process on the host (``RunnerProcess``); its log must hold no traceback."""
    process = RunnerProcess()
    yield process
    log = process.log()
    process.stop()
    assert "Traceback" not in log, "the runner logged an error:\n" + log
