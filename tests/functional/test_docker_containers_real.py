"""
Container behaviour only the real daemon shows, beyond the shared contract: raw logs of
a TTY container, large logs split into many frames, and cancelling a long wait without
upsetting the client. Every container is ``bai-test-*`` on ``NetworkMode: none`` and is
removed when its test ends.
"""

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError

from bai_agent.testing.docker_contract import PRINT_CMD, PYTHON, SLEEP_CMD, container_config
from tests.functional.test_docker_contract_real import real_docker_fixture

pytestmark = pytest.mark.functional


@pytest.fixture
def docker(request):
    return real_docker_fixture(request)


@pytest_twisted.inlineCallbacks
def test_logs_of_a_tty_container_are_the_raw_terminal_output(docker):
    name = docker.container_name()
    config = container_config(docker, PRINT_CMD, Tty=True)
    container_id = yield docker.backend.create_container(name, config)
    yield docker.backend.start_container(container_id)
    exit_code = yield docker.backend.wait_container(container_id)
    assert exit_code == 0
    logs = yield docker.backend.container_logs(container_id)
    # One terminal: both streams in it, with the terminal's CRLF line ends.
    assert logs == "out\r\nerr\r\n"


@pytest_twisted.inlineCallbacks
def test_large_logs_come_back_whole(docker):
    # The json-file log driver stores long lines as 16 KiB entries: many frames.
    script = (
        "import sys\n"
        "for i in range(3): sys.stdout.write('o%d' % i + 'x' * 100000 + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdout.buffer.write(b'bad \\xff byte\\n')\n"
    )
    name = docker.container_name()
    container_id = yield docker.backend.create_container(name, container_config(docker, [PYTHON, "-c", script]))
    yield docker.backend.start_container(container_id)
    exit_code = yield docker.backend.wait_container(container_id)
    assert exit_code == 0
    logs = yield docker.backend.container_logs(container_id)
    expected = "".join(f"o{i}" + "x" * 100000 + "\n" for i in range(3))
    assert logs == expected + "bad \ufffd byte\n"


@pytest_twisted.inlineCallbacks
def test_a_long_line_is_not_torn_by_the_other_stream(docker):
    # 40 KB of a stdout line, a whole stderr line, then the stdout line's end: the
    # daemon logs stdout 16 KiB, stdout 16 KiB, stderr, stdout rest.
    script = (
        "import sys, time\n"
        "sys.stdout.write('x' * 40000); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stderr.write('err\\n'); sys.stderr.flush(); time.sleep(0.3)\n"
        "sys.stdout.write('\\n')\n"
    )
    name = docker.container_name()
    container_id = yield docker.backend.create_container(name, container_config(docker, [PYTHON, "-c", script]))
    yield docker.backend.start_container(container_id)
    exit_code = yield docker.backend.wait_container(container_id)
    assert exit_code == 0
    logs = yield docker.backend.container_logs(container_id)
    assert logs == "err\n" + "x" * 40000 + "\n"


@pytest_twisted.inlineCallbacks
def test_a_cancelled_wait_leaves_the_client_working(docker):
    name = docker.container_name()
    container_id = yield docker.backend.create_container(name, container_config(docker, SLEEP_CMD))
    yield docker.backend.start_container(container_id)
    waiting = docker.backend.wait_container(container_id)
    yield docker.settle(0.3)
    waiting.cancel()
    with pytest.raises(CancelledError):
        yield waiting
    info = yield docker.backend.inspect_container(container_id)
    assert info["State"]["Running"] is True
    waiting = docker.backend.wait_container(container_id)
    yield docker.backend.kill_container(container_id)
    exit_code = yield waiting
    assert exit_code == 137
