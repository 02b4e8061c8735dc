"""
Fixtures for functional tests: a real etcd server per test session, and the real Docker
daemon. A missing component fails the test with a clear message; nothing is skipped.
"""

import pytest

from bai_agent.testing.docker_host import require_docker
from bai_agent.testing.etcd_server import EtcdServer


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
