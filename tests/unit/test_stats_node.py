"""NodeStats with a stand-in for psutil."""

import collections

import psutil
import pytest

from bai_agent.stats.node import NodeStats

GIB = 1 << 30

VirtualMemory = collections.namedtuple("VirtualMemory", "total available percent used free")
DiskUsage = collections.namedtuple("DiskUsage", "total used free percent")
NetIO = collections.namedtuple("NetIO", "bytes_sent bytes_recv packets_sent packets_recv errin errout dropin dropout")


class FakePsutil:
    """psutil's answers for a 4-core machine; ``fail`` names functions that raise."""

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.cpu_percent_calls = 0
        self.disk_paths = []

    def _maybe_fail(self, name):
        if name in self.fail:
            raise OSError(f"{name} failed")

    def cpu_count(self, logical=True):
        return 4

    def cpu_percent(self, interval=None, percpu=False):
        self._maybe_fail("cpu_percent")
        self.cpu_percent_calls += 1
        if self.cpu_percent_calls == 1:
            return [0.0, 0.0, 0.0, 0.0]  # psutil's first call: nothing to compare with
        return [100.0, 50.0, 10.0, 0.0]

    def virtual_memory(self):
        self._maybe_fail("virtual_memory")
        return VirtualMemory(total=16 * GIB, available=10 * GIB, percent=37.5, used=5 * GIB, free=9 * GIB)

    def disk_usage(self, path):
        self._maybe_fail("disk_usage")
        self.disk_paths.append(path)
        return DiskUsage(total=500 * GIB, used=120 * GIB, free=380 * GIB, percent=24.0)

    def net_io_counters(self, pernic=False):
        self._maybe_fail("net_io_counters")
        assert pernic
        return {
            "lo": NetIO(9000, 9000, 1, 1, 0, 0, 0, 0),
            "eth0": NetIO(300, 1000, 1, 1, 0, 0, 0, 0),
            "eth1": NetIO(20, 5, 1, 1, 0, 0, 0, 0),
        }


def test_a_sample_has_cpu_memory_disk_and_network():
    fake = FakePsutil()
    assert NodeStats("/srv/scratch", psutil_module=fake).sample() == {
        "cpu": {"count": 4, "percent": 40.0, "per_core": [100.0, 50.0, 10.0, 0.0]},
        "mem": {"total": 16 * GIB, "used": 5 * GIB, "available": 10 * GIB},
        "disk": {"path": "/srv/scratch", "total": 500 * GIB, "used": 120 * GIB, "free": 380 * GIB},
        "net": {"rx_bytes": 1005, "tx_bytes": 320},
    }
    assert fake.disk_paths == ["/srv/scratch"]


def test_the_first_sample_already_has_cpu_figures():
    # psutil's first cpu_percent answers zeros; it is made when NodeStats is built.
    fake = FakePsutil()
    node = NodeStats("/srv/scratch", psutil_module=fake)
    assert node.sample()["cpu"]["per_core"] == [100.0, 50.0, 10.0, 0.0]


@pytest.mark.parametrize(
    "failing, section",
    [("cpu_percent", "cpu"), ("virtual_memory", "mem"), ("disk_usage", "disk"), ("net_io_counters", "net")],
)
def test_a_failing_section_is_an_error_and_the_others_stay(failing, section):
    node = NodeStats("/srv/scratch", psutil_module=FakePsutil(fail=[failing]))
    sample = node.sample()
    expected_error = {"error": f"OSError: {failing} failed"}
    if section == "disk":
        expected_error["path"] = "/srv/scratch"
    assert sample[section] == expected_error
    others = {"cpu", "mem", "disk", "net"} - {section}
    assert all("error" not in sample[name] for name in others)


def test_with_the_real_psutil(tmp_path):
    sample = NodeStats(str(tmp_path), psutil_module=psutil).sample()
    assert sample["cpu"]["count"] == psutil.cpu_count()
    assert len(sample["cpu"]["per_core"]) == sample["cpu"]["count"]
    assert 0 < sample["mem"]["available"] <= sample["mem"]["total"]
    assert sample["disk"]["path"] == str(tmp_path)
    assert sample["disk"]["total"] >= sample["disk"]["free"] > 0
    assert sample["net"]["rx_bytes"] >= 0 and sample["net"]["tx_bytes"] >= 0


@pytest.mark.parametrize("root", ["", None])
def test_a_scratch_root_is_required(root):
    with pytest.raises(ValueError):
        NodeStats(root, psutil_module=FakePsutil())
