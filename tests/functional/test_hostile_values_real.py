"""
Values from etcd and from managers that once slipped past the checks, tried on a real
agent: an exec timeout in etcd far out of range (every Execute then failed and left the
kernel on RUN_CONFLICT), and names with a trailing newline (``^...$`` accepted them).
"""

import subprocess
import time

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


def etcdctl(etcd_server, *args):
    return subprocess.run(
        ["etcdctl", "--endpoints", etcd_server.url, *args],
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


@pytest_twisted.inlineCallbacks
def test_an_exec_timeout_out_of_range_in_etcd_is_ignored(client, agent, etcd_server):
    key = f"/bai/{agent.namespace}/config/agent/exec_timeout"
    etcdctl(etcd_server, "put", key, "99999999999999999999")
    try:
        deadline = time.monotonic() + 10
        while "ignoring invalid cluster config" not in agent.log_text():
            assert time.monotonic() < deadline, "the agent never looked at the value"
            time.sleep(0.1)
        record = yield client.create_kernel("huge-timeout", IMAGE, {"cpu": 0.5, "mem": "128m"})
        assert record["exec_timeout"] == 0
        for _ in range(2):
            console, answer = yield run_to_end(client, "huge-timeout", "query", "print('ran')")
            assert answer["status"] == "finished" and text(console) == "ran\n"
    finally:
        etcdctl(etcd_server, "del", key)


@pytest_twisted.inlineCallbacks
def test_names_with_a_trailing_newline_are_invalid(client, agent):
    with pytest.raises(errors.InvalidRequest, match="kernel_id"):
        yield client.create_kernel("k\n", IMAGE, {"cpu": 0.5, "mem": "128m"})
    with pytest.raises(errors.InvalidRequest, match="environ"):
        yield client.create_kernel("k", IMAGE, {"cpu": 0.5, "mem": "128m"}, environ={"FOO\n": "x"})
    assert (yield client.list_kernels()) == []
