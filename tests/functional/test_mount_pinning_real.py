"""
A mount source is checked, and what was checked is what Docker mounts, at every container
start: an allowed directory replaced on the host by a symlink to a root-only directory
is never mounted (PROTOCOL.md section 6). Before, Docker resolved the path again at the
next ``RestartKernel`` and mounted the symlink's target, read-write if asked.
"""

import os

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from tests.functional.agent_process import running_agent
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "set").mkdir(parents=True)
    (allowed / "set" / "data.txt").write_text("shared data\n")
    os.chmod(allowed / "set", 0o777)
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_text("host secret\n")
    return allowed, secret


@pytest.fixture
def agent(tmp_path, roots, etcd_server, docker_host):
    allowed, _ = roots
    with running_agent(tmp_path, etcd_server.addr, "agent-mounts", ["--allowed-mount-root", str(allowed)]) as process:
        yield process


@pytest_twisted.inlineCallbacks
def test_a_source_swapped_for_a_symlink_is_never_mounted(agent, roots, reactor):
    allowed, secret = roots
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", agent.secret_path.read_text().strip())
    try:
        mounts = [{"source": str(allowed / "set"), "target": "/data/set", "mode": "rw"}]
        yield client.create_kernel("m", IMAGE, {"cpu": 0.5, "mem": "128m"}, mounts=mounts)
        console, _ = yield run_to_end(client, "m", "query", "print(open('/data/set/data.txt').read(), end='')")
        assert text(console) == "shared data\n"
        # Nothing of the pin is left on the host once the container runs.
        with open("/proc/self/mountinfo") as mountinfo:
            assert str(agent.state_dir) not in mountinfo.read()

        # The attacker (with write access to the allowed root) swaps the directory.
        os.rename(allowed / "set", allowed / "set.orig")
        os.symlink(secret, allowed / "set")
        with pytest.raises(errors.KernelCreationFailed, match="symlink"):
            yield client.restart_kernel("m")
        assert not (secret / "pwned").exists()
        # A new kernel asking for the same path is refused too, and nothing is left.
        with pytest.raises(errors.InvalidRequest, match="allowed mount root"):
            yield client.create_kernel("m2", IMAGE, {"cpu": 0.5, "mem": "128m"}, mounts=mounts)
        assert (yield client.list_kernels()) == []
    finally:
        yield client.reset()
        client.close()


@pytest_twisted.inlineCallbacks
def test_a_read_only_mount_stays_read_only_and_reserved_targets_are_refused(agent, roots, reactor):
    allowed, _ = roots
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", agent.secret_path.read_text().strip())
    try:
        for target in ("/", "/home", "/home/work/x", "/run", "/opt/bai/runner", "/proc", "/sys/x", "/dev", "/tmp"):
            with pytest.raises(errors.InvalidRequest, match="reserved"):
                yield client.create_kernel(
                    "r",
                    IMAGE,
                    {"cpu": 0.5, "mem": "128m"},
                    mounts=[{"source": str(allowed / "set"), "target": target, "mode": "ro"}],
                )
        mounts = [{"source": str(allowed / "set"), "target": "/data/ro", "mode": "ro"}]
        yield client.create_kernel("ro", IMAGE, {"cpu": 0.5, "mem": "128m"}, mounts=mounts)
        for _attempt in range(2):
            console, _ = yield run_to_end(
                client,
                "ro",
                "query",
                "try:\n    open('/data/ro/new', 'w')\nexcept OSError as e:\n    print(e.errno)\n",
            )
            assert text(console) == "30\n"  # EROFS
            yield client.restart_kernel("ro")
        assert not (allowed / "set" / "new").exists()
    finally:
        yield client.reset()
        client.close()
