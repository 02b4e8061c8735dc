"""The IDockerBackend contract, on the in-memory fake."""

import itertools

from twisted.internet.defer import succeed

from bai_agent.testing.docker_contract import (
    KERNEL_LABELS,
    OOM_CMD,
    PRINT_CMD,
    make_docker_backend_tests,
)
from bai_agent.testing.fake_docker import FakeDockerBackend


class FakeDockerFixture:
    kernel_image = "bai-kernel/python:3.11"

    def __init__(self):
        self.backend = FakeDockerBackend()
        self._names = itertools.count()
        self.backend.add_image(self.kernel_image, KERNEL_LABELS)
        # The fake runs no process: make the contract's commands behave as they do.
        self.backend.on_start(PRINT_CMD, self._print_and_exit)
        self.backend.on_start(OOM_CMD, self._run_out_of_memory)

    def _print_and_exit(self, container_id):
        self.backend.set_logs(container_id, "out\nerr\n")
        self.backend.die(container_id, 0)

    def _run_out_of_memory(self, container_id):
        self.backend.die(container_id, 137, oom=True)

    def unique_name(self):
        return f"bai-agent-test/contract-{next(self._names)}:1"

    def container_name(self):
        return f"bai-test-{next(self._names)}"

    def add_image(self, name, labels):
        return self.backend.add_image(name, labels)

    def tag_image(self, source, target):
        self.backend.tag_image(source, target)

    def remove_image(self, name):
        self.backend.delete_image(name)

    def unreachable_backend(self):
        backend = FakeDockerBackend()
        backend.set_available(False)
        return backend

    def settle(self, seconds):
        return succeed(None)  # the fake delivers everything synchronously


class TestFakeDockerContract(make_docker_backend_tests(lambda request: FakeDockerFixture())):
    pass
