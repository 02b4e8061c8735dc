"""
A kernel cannot fill the host's disk (PROTOCOL.md section 6, "Disk"): its home holds at
most its ``scratch`` grant, its root filesystem is read-only and its /tmp is memory.

The agent's scratch root here is a filesystem the test makes (a loop-mounted ext4 image),
so that what the host lost can be measured exactly. This machine's kernel has no quota
support (CONFIG_QUOTA is off: ext4 ``prjquota`` and XFS ``prjquota`` both refuse to
mount), so the homes are limited by per-kernel images (``--scratch-type hostfile``), and
``--scratch-type quota`` is shown to fail start-up with a clear message.
"""

import os
import subprocess

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from tests.functional.agent_process import AgentProcess, running_agent
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


MIB = 1 << 20

FILL = """
import errno, os
written = 0
chunk = b"x" * (1 << 20)
try:
    with open("fill.bin", "wb") as f:
        while written < (1 << 30):
            f.write(chunk)
            f.flush()
            written += len(chunk)
        os.fsync(f.fileno())
    print("no limit", written)
except OSError as e:
    print(errno.errorcode.get(e.errno), written // (1 << 20))
"""


@pytest.fixture
def disk(tmp_path):
    """A 512 MiB ext4 filesystem of the test's own, mounted at ``tmp_path/disk``."""
    image, point = tmp_path / "disk.img", tmp_path / "disk"
    point.mkdir()
    subprocess.run(["truncate", "-s", "512M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def free_bytes(path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def loop_devices_of(path) -> list:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if str(path) in line]


@pytest.fixture
def agent(tmp_path, disk, etcd_server, docker_host):
    extra = ["--scratch-root", str(disk / "scratches"), "--scratch-type", "hostfile", "--default-scratch-size", "32m"]
    with running_agent(tmp_path, etcd_server.addr, "agent-disk", extra) as process:
        process.scratch_root = disk / "scratches"
        yield process


@pytest_twisted.inlineCallbacks
def test_a_kernel_that_fills_its_home_gets_enospc_and_the_host_loses_no_more(agent, disk, reactor):
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", agent.secret_path.read_text().strip())
    try:
        info = yield client.get_agent_info()
        capacity = info["resources"]["scratch"]["capacity"]
        assert 400 * MIB < capacity <= 512 * MIB
        with pytest.raises(errors.InsufficientResources, match="scratch"):
            yield client.create_kernel("huge", IMAGE, {"cpu": 0.5, "mem": "128m", "scratch": "1g"})

        filler = yield client.create_kernel("filler", IMAGE, {"cpu": 0.5, "mem": "128m", "scratch": "64m"})
        assert filler["resources"]["scratch"] == 64 * MIB
        neighbour = yield client.create_kernel("neighbour", IMAGE, {"cpu": 0.5, "mem": "128m"})
        assert neighbour["resources"]["scratch"] == 32 * MIB  # --default-scratch-size
        info = yield client.get_agent_info()
        assert info["resources"]["scratch"]["used"] == 96 * MIB

        before = free_bytes(disk)
        console, _ = yield run_to_end(client, "filler", "query", FILL)
        code, megabytes = text(console).split()
        assert code == "ENOSPC", text(console)
        assert 40 <= int(megabytes) <= 64
        lost = before - free_bytes(disk)
        assert lost <= 70 * MIB, f"the host lost {lost} bytes for a 64 MiB grant"

        # The agent and the other kernel work on; the full kernel too, within its home.
        console, _ = yield run_to_end(
            client, "neighbour", "query", "open('ok', 'w').write('fine'); print(open('ok').read())"
        )
        assert text(console) == "fine\n"
        console, _ = yield run_to_end(client, "filler", "query", "import os; os.remove('fill.bin'); print('freed')")
        assert text(console) == "freed\n"
        stats = yield client.get_kernel_stats("neighbour")
        assert "scratch_bytes" in stats

        yield client.destroy_kernel("filler")
        yield client.destroy_kernel("neighbour")
        assert sorted(p.name for p in agent.scratch_root.iterdir() if p.name != ".volumes") == []
        assert list((agent.scratch_root / ".volumes").iterdir()) == []
        assert loop_devices_of(agent.scratch_root) == []
        with open("/proc/self/mountinfo") as mountinfo:
            assert str(agent.scratch_root) not in mountinfo.read()
        info = yield client.get_agent_info()
        assert info["resources"]["scratch"]["used"] == 0
    finally:
        yield client.reset()
        client.close()


@pytest_twisted.inlineCallbacks
def test_the_root_filesystem_is_read_only_and_tmp_is_bounded_memory(agent, reactor):
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", agent.secret_path.read_text().strip())
    try:
        yield client.create_kernel("ro", IMAGE, {"cpu": 0.5, "mem": "96m"})
        console, _ = yield run_to_end(
            client,
            "ro",
            "query",
            "import errno, os\n"
            "for path in ('/big', '/usr/big', '/var/big', '/etc/big'):\n"
            "    try:\n"
            "        open(path, 'w')\n"
            "        print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n"
            "open('/tmp/scratch', 'wb').write(b'x' * (8 << 20))\n"
            "tmp = os.statvfs('/tmp')\n"
            "print(tmp.f_blocks * tmp.f_frsize >> 20)\n",
        )
        lines = text(console).split()
        assert lines[:4] == ["EROFS", "EROFS", "EROFS", "EROFS"], lines
        assert lines[4] == "96"  # /tmp is as big as the memory grant, no bigger
        # The home still works after a restart (the image is the same, its files kept).
        yield run_to_end(client, "ro", "query", "open('kept', 'w').write('yes')")
        yield client.restart_kernel("ro")
        console, _ = yield run_to_end(client, "ro", "query", "print(open('kept').read())")
        assert text(console) == "yes\n"
    finally:
        yield client.reset()
        client.close()


def test_quota_scratch_type_fails_start_up_clearly_where_the_filesystem_has_none(tmp_path, disk, etcd_server):
    agent = AgentProcess(
        tmp_path,
        etcd_server.addr,
        agent_id="agent-quota",
        extra=["--scratch-root", str(disk / "q"), "--scratch-type", "quota", "--kernel-network", "none"],
    )
    assert agent.failed_start() != 0
    assert "--scratch-type quota" in agent.log_text() and "prjquota" in agent.log_text()
