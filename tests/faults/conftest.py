"""
The fault suite: real agent processes, real etcd and Docker, and the faults done for real
(processes killed, dockerd and etcd stopped and started, connections aborted).

Run it on its own, after the other tests: ``pytest tests/faults``. It prints its figures at
the end; every test also asserts its own zeros.
"""

import pytest

from bai_agent.testing.docker_host import require_docker, require_kernel_image
from bai_agent.testing.etcd_server import EtcdServer
from bai_agent.testing.private_docker import PrivateDockerd
from tests.faults.helpers import Ledger, Scenario

LEDGER = pytest.StashKey[Ledger]()


def _ledger(config) -> Ledger:
    if LEDGER not in config.stash:
        config.stash[LEDGER] = Ledger()
    return config.stash[LEDGER]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ledger = config.stash.get(LEDGER, None)
    if ledger is None or not ledger.tests:
        return
    terminalreporter.write_sep("=", "fault suite figures")
    for nodeid, figures in sorted(ledger.tests.items()):
        problems = figures.problems()
        if problems:
            terminalreporter.write_line(f"{nodeid}: {'; '.join(problems)}")
    terminalreporter.write_line(ledger.summary())


@pytest.fixture(scope="session")
def ledger(request):
    return _ledger(request.config)


@pytest.fixture
def figures(request, ledger):
    """This test's line in the ledger."""
    return ledger.figures(request.node.nodeid)


@pytest.fixture(scope="session")
def docker_host():
    return require_docker()


@pytest.fixture(scope="session")
def kernel_image(docker_host):
    return require_kernel_image(docker_host)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test alone, for tests that stop it or wipe its data."""
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def private_dockerd_session(docker_host, kernel_image):
    """
    A dockerd of the suite's own (never the system one), with the kernel image loaded
    once for the session.
    """
    daemon = PrivateDockerd(name="bai-faults")
    try:
        daemon.start()
        daemon.load_image(kernel_image, source_host=docker_host)
        yield daemon
    finally:
        daemon.close(remove_root=True)


@pytest.fixture
def private_dockerd(private_dockerd_session):
    """The private dockerd, running without live-restore when the test starts."""
    daemon = private_dockerd_session
    if daemon.running and daemon.live_restore:
        daemon.stop()
    daemon.start(live_restore=False)
    yield daemon
    if not daemon.running:
        daemon.start(live_restore=False)


@pytest.fixture
def scenario(reactor, tmp_path, figures, etcd_server, docker_host, kernel_image):
    s = Scenario(reactor, tmp_path, figures, etcd_server, docker_host, kernel_image)
    yield s
    s.close()


@pytest.fixture
def private_scenario(private_dockerd, scenario):
    """A scenario whose agents use the private dockerd (set ``docker_host`` on them)."""
    scenario.docker_host = private_dockerd.host
    yield scenario
    # Before the scenario's teardown removes its containers: the daemon must answer.
    if not private_dockerd.running:
        private_dockerd.start()
