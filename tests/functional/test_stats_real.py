"""
Statistics of real containers: CgroupReader and StatsCollector against the real Docker
daemon and the host's real cgroups (whichever version it runs), no agent process.

Each container runs the kernel image on ``--network none``, carries the label
``ai.backend.agent-id=stats-test-<pid>`` and is removed when its test ends.
"""

import os
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bai_agent.stats import SAMPLE_KEYS, CgroupReader, KernelTarget, StatsCollector
from bai_agent.testing.docker_cli import docker
from bai_agent.testing.docker_host import remove_container, require_kernel_image
from bai_agent.testing.waiting import sleep

pytestmark = pytest.mark.functional


MIB = 1 << 20
LABEL = f"ai.backend.agent-id=stats-test-{os.getpid()}"
DATA_SIZE = 4 * MIB
BURN_SECONDS = 3

# Allocates and touches 100 MiB, writes DATA_SIZE bytes to its home, sends a little to
# itself on loopback (which must not count), then burns a core for BURN_SECONDS
# (markers in the home tell the test where it is) and sleeps, keeping the memory.
WORKLOAD = f"""
import os, socket, time
b = bytearray(100 * 2**20)
for i in range(0, len(b), 4096):
    b[i] = 1
with open('/home/work/data.bin', 'wb') as f:
    f.write(b'z' * {DATA_SIZE})
    f.flush()
    os.fsync(f.fileno())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b'x' * 1000, ('127.0.0.1', 9))
open('/home/work/ready', 'w').close()
t = time.time()
while time.time() - t < {BURN_SECONDS}:
    pass
open('/home/work/burned', 'w').close()
time.sleep(600)
"""


@pytest.fixture
def kernel_image(docker_host):
    return require_kernel_image(docker_host)


@pytest.fixture
def containers(docker_host):
    made = []
    yield made
    for container_id in made:
        remove_container(container_id, docker_host)


def run_container(containers, image, home, command):
    os.chmod(home, 0o777)
    container_id = docker(
        "run",
        "-d",
        "--label",
        LABEL,
        "--network",
        "none",
        "--memory",
        "256m",
        "--memory-swap",
        "256m",
        "-v",
        f"{home}:/home/work",
        "--user",
        "0:0",
        "--entrypoint",
        "python3",
        image,
        "-c",
        command,
    ).stdout.strip()
    containers.append(container_id)
    return container_id


@pytest_twisted.inlineCallbacks
def wait_for_file(reactor, path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        yield sleep(reactor, 0.05)


def lo_bytes(pid):
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f.read().splitlines()[2:]:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[0])
    return 0


@pytest_twisted.inlineCallbacks
def test_a_busy_container_as_the_collector_sees_it(reactor, tmp_path, containers, kernel_image):
    home = tmp_path / "home"
    home.mkdir()
    container_id = run_container(containers, kernel_image, home, WORKLOAD)
    target = KernelTarget("k-busy", container_id, str(home))
    reader = CgroupReader()
    collector = StatsCollector(reactor, reader, lambda: [target], deferToThread, interval=3600)

    yield wait_for_file(reactor, home / "ready", 60)
    yield collector.sample()
    first = collector.latest("k-busy")
    yield sleep(reactor, 1.0)  # still burning
    yield collector.sample()
    during = collector.latest("k-busy")
    yield wait_for_file(reactor, home / "burned", 30)
    after = yield collector.sample_kernel(target)

    assert tuple(after) == SAMPLE_KEYS
    assert during["sampled_at"] - first["sampled_at"] >= 0.9
    assert during["cpu_util"] > 50.0, during
    elapsed = after["sampled_at"] - first["sampled_at"] + 60  # generous: since start-up
    assert 1500 <= after["cpu_used_ms"] <= elapsed * 1000 * os.cpu_count(), after
    assert after["mem_bytes"] >= 100 * MIB, after
    assert after["mem_max_bytes"] >= after["mem_bytes"]
    assert after["mem_bytes"] <= 256 * MIB
    assert after["scratch_bytes"] >= DATA_SIZE, after
    assert after["pids"] >= 1
    # Only loopback exists without a network, and loopback does not count...
    assert (after["net_rx_bytes"], after["net_tx_bytes"]) == (0, 0)
    # ... although the container did use it.
    raw = yield deferToThread(reader.read, container_id)
    assert lo_bytes(raw["pid"]) >= 1000
    assert after["io_read_bytes"] >= 0 and after["io_write_bytes"] >= 0
    assert reader.drain_problems() == []


@pytest_twisted.inlineCallbacks
def test_a_removed_container_keeps_its_last_sample(reactor, tmp_path, containers, kernel_image, docker_host):
    home = tmp_path / "home"
    home.mkdir()
    container_id = run_container(
        containers, kernel_image, home, "import time\nopen('/home/work/ready', 'w').close()\ntime.sleep(600)"
    )
    target = KernelTarget("k-gone", container_id, str(home))
    reader = CgroupReader()
    collector = StatsCollector(reactor, reader, lambda: [target], deferToThread, interval=3600)
    yield wait_for_file(reactor, home / "ready", 60)
    yield collector.sample()
    latest = collector.latest("k-gone")
    assert latest is not None and latest["pids"] >= 1 and latest["cpu_used_ms"] >= 0

    remove_container(container_id, docker_host)
    assert (yield deferToThread(reader.read, container_id)) is None
    assert (yield collector.sample_kernel(target)) == latest
    yield collector.sample()
    assert collector.latest("k-gone") == latest


@pytest_twisted.inlineCallbacks
def test_the_collector_service_samples_on_its_own(reactor, tmp_path, containers, kernel_image):
    homes = []
    targets = []
    for index in range(3):
        home = tmp_path / f"home{index}"
        home.mkdir()
        homes.append(home)
        container_id = run_container(
            containers, kernel_image, home, "import time\nopen('/home/work/ready', 'w').close()\ntime.sleep(600)"
        )
        targets.append(KernelTarget(f"k{index}", container_id, str(home)))
    for home in homes:
        yield wait_for_file(reactor, home / "ready", 60)
    collector = StatsCollector(reactor, CgroupReader(), lambda: targets, deferToThread, interval=0.2)
    collector.startService()
    try:
        deadline = time.monotonic() + 20
        while collector.rounds < 3 and time.monotonic() < deadline:
            yield sleep(reactor, 0.1)
    finally:
        yield collector.stopService()
    assert collector.rounds >= 3
    assert set(collector.latest_all()) == {"k0", "k1", "k2"}
    assert all(sample["pids"] >= 1 and sample["mem_bytes"] > 0 for sample in collector.latest_all().values())
