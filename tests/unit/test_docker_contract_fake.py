"""The IDockerBackend contract, on the in-memory fake."""

import itertools

from twisted.internet.defer import succeed

from bai_agent.testing.docker_contract import make_docker_backend_tests
from bai_agent.testing.fake_docker import FakeDockerBackend


class FakeDockerFixture:
    def __init__(self):
        self.backend = FakeDockerBackend()
        self._names = itertools.count()

    def unique_name(self):
        return f"bai-agent-test/contract-{next(self._names)}:1"

    def add_image(self, name, labels):
        return self.backend.add_image(name, labels)

    def tag_image(self, source, target):
        self.backend.tag_image(source, target)

    def remove_image(self, name):
        self.backend.remove_image(name)

    def unreachable_backend(self):
        backend = FakeDockerBackend()
        backend.set_available(False)
        return backend

    def settle(self, seconds):
        return succeed(None)  # the fake delivers everything synchronously


class TestFakeDockerContract(make_docker_backend_tests(lambda request: FakeDockerFixture())):
    pass
