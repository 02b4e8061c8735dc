"""
``DockerEngineClient.read_file`` against the real daemon and the data-science image: the
image's own service definition comes back; a directory, a symlink, a missing file and a
file over the limit are refused without the file being read.
"""

import json

import pytest
import pytest_twisted

from bai_agent.docker.engine import DockerEngineClient
from bai_agent.docker.interface import DockerError, DockerNotFound
from bai_agent.testing.docker_cli import docker
from tests.functional.test_rich_output_real import sci_image  # noqa: F401 (fixture)

pytestmark = pytest.mark.functional

DEFINITION = "/etc/backend.ai/service-defs/jupyter.json"


@pytest.fixture
def container(sci_image, docker_host):  # noqa: F811
    container_id = docker("create", "--network", "none", sci_image, "true", docker_host=docker_host).stdout.strip()
    yield container_id
    docker("rm", "-f", container_id, docker_host=docker_host, check=False)


@pytest_twisted.async_yield_fixture
async def client(reactor, docker_host):
    client = DockerEngineClient(reactor, docker_host)
    yield client
    await client.close()


@pytest_twisted.inlineCallbacks
def test_reads_the_images_service_definition(client, container):
    data = yield client.read_file(container, DEFINITION, 64 * 1024)
    assert json.loads(data)["command"][0].endswith("/jupyter-notebook")


@pytest_twisted.inlineCallbacks
def test_refuses_what_is_not_a_small_regular_file(client, container):
    with pytest.raises(DockerError, match="not a regular file"):
        yield client.read_file(container, "/etc", 64 * 1024)
    with pytest.raises(DockerError, match="not a regular file"):
        yield client.read_file(container, "/etc/os-release", 64 * 1024)  # a symlink in Debian
    with pytest.raises(DockerError, match="more than 10"):
        yield client.read_file(container, DEFINITION, 10)
    with pytest.raises(DockerNotFound):
        yield client.read_file(container, "/etc/backend.ai/service-defs/nothing.json", 64 * 1024)
