"""The IDockerBackend contract, on the real Docker daemon through DockerEngineClient."""

import uuid

import pytest

from bai_agent.docker.engine import DockerEngineClient
from bai_agent.testing import docker_host as host_helpers
from bai_agent.testing.docker_contract import make_docker_backend_tests
from bai_agent.testing.waiting import sleep

pytestmark = pytest.mark.functional


class RealDockerFixture:
    """
    Images it makes are named ``bai-agent-test/contract-*``, containers
    ``bai-test-<random>``; both are removed afterwards.
    """

    def __init__(self, reactor, docker_host, tmp_path, kernel_image):
        self._reactor = reactor
        self._docker_host = docker_host
        self._tmp_path = tmp_path
        self._names = []
        self._container_names = []
        self._backends = []
        self.kernel_image = kernel_image
        self.backend = self._client(docker_host)

    def _client(self, docker_host):
        client = DockerEngineClient(self._reactor, docker_host, timeout=10.0)
        self._backends.append(client)
        return client

    def unique_name(self):
        return f"bai-agent-test/contract-{uuid.uuid4().hex[:12]}:1"

    def container_name(self):
        name = f"bai-test-{uuid.uuid4().hex[:12]}"
        self._container_names.append(name)
        return name

    def add_image(self, name, labels):
        self._names.append(name)
        return host_helpers.import_test_image(name, labels, docker_host=self._docker_host)

    def tag_image(self, source, target):
        self._names.append(target)
        host_helpers.tag_image(source, target, docker_host=self._docker_host)

    def remove_image(self, name):
        host_helpers.remove_image(name, docker_host=self._docker_host)

    def unreachable_backend(self):
        return self._client(f"unix://{self._tmp_path}/no-docker-here.sock")

    def settle(self, seconds):
        return sleep(self._reactor, seconds)

    def cleanup(self):
        for backend in self._backends:
            backend.close()
        for name in self._container_names:
            host_helpers.remove_container(name, docker_host=self._docker_host)
        for name in reversed(self._names):
            host_helpers.remove_image(name, docker_host=self._docker_host)


def real_docker_fixture(request):
    docker_host = request.getfixturevalue("docker_host")
    fixture = RealDockerFixture(
        request.getfixturevalue("reactor"),
        docker_host,
        request.getfixturevalue("tmp_path"),
        host_helpers.require_kernel_image(docker_host),
    )
    request.addfinalizer(fixture.cleanup)
    return fixture


class TestRealDockerContract(make_docker_backend_tests(real_docker_fixture)):
    pass
