"""CgroupReader over fake cgroup trees (v1 and v2) written as the kernel writes them."""

import os
import shutil

import pytest

from bai_agent.stats.cgroups import CgroupReader, candidate_paths, detect_cgroup_version

CID = "4f1c" * 16  # a 64-hex-digit container id
OTHER = "9e2b" * 16

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    5000      10    0    0    0     0          0         0     5000      10    0    0    0     0       0          0
  eth0:    1200       8    0    0    0     0          0         0      800       6    0    0    0     0       0          0
  eth1:      34       1    0    0    0     0          0         0       66       1    0    0    0     0       0          0
"""  # noqa: E501 (/proc/net/dev lines as the kernel writes them)

NET_DEV_LO_ONLY = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1604       2    0    0    0     0          0         0     1604       2    0    0    0     0       0          0
"""  # noqa: E501

BLKIO = """\
8:0 Read 1048576
8:0 Write 4096
8:0 Sync 4096
8:0 Async 1048576
8:0 Discard 0
8:0 Total 1052672
253:0 Read 10
253:0 Write 20
253:0 Sync 0
253:0 Async 30
253:0 Discard 0
253:0 Total 30
Total 1052702
"""

CPU_STAT_V2 = """\
usage_usec 2500000
user_usec 2000000
system_usec 500000
nr_periods 0
nr_throttled 0
throttled_usec 0
nr_bursts 0
burst_usec 0
"""

IO_STAT_V2 = """\
8:0 rbytes=1048576 wbytes=4096 rios=16 wios=1 dbytes=0 dios=0
253:0 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0
"""


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def proc_with(proc, pid, net_dev=NET_DEV):
    write(os.path.join(proc, str(pid), "net", "dev"), net_dev)


def v1_tree(
    root, relative, *, cpu_ns=2_500_000_000, mem=150 << 20, mem_max=200 << 20, pids=3, procs="42\n43\n", mounts=None
):
    """A v1 container cgroup at ``relative`` under each controller mount."""
    mounts = mounts or {"cpuacct": "cpuacct", "memory": "memory", "blkio": "blkio", "pids": "pids"}
    for name in ("cpu", "cpuset", "devices", "freezer"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    os.makedirs(os.path.join(root, "unified"), exist_ok=True)
    write(os.path.join(root, "unified", "cgroup.controllers"), "")  # hybrid: empty v2 tree
    cpu = os.path.join(root, mounts["cpuacct"], relative)
    write(os.path.join(cpu, "cpuacct.usage"), f"{cpu_ns}\n")
    write(os.path.join(cpu, "cgroup.procs"), procs)
    memory = os.path.join(root, mounts["memory"], relative)
    write(os.path.join(memory, "memory.usage_in_bytes"), f"{mem}\n")
    write(os.path.join(memory, "memory.max_usage_in_bytes"), f"{mem_max}\n")
    write(os.path.join(memory, "cgroup.procs"), procs)
    blkio = os.path.join(root, mounts["blkio"], relative)
    write(os.path.join(blkio, "blkio.throttle.io_service_bytes"), BLKIO)
    write(os.path.join(blkio, "cgroup.procs"), procs)
    pids_dir = os.path.join(root, mounts["pids"], relative)
    write(os.path.join(pids_dir, "pids.current"), f"{pids}\n")
    write(os.path.join(pids_dir, "cgroup.procs"), procs)


def v2_tree(root, relative, *, usage_usec=2_500_000, mem=150 << 20, peak=200 << 20, pids=3, procs="42\n43\n"):
    write(os.path.join(root, "cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n")
    group = os.path.join(root, relative)
    write(os.path.join(group, "cpu.stat"), CPU_STAT_V2.replace("2500000", str(usage_usec), 1))
    write(os.path.join(group, "memory.current"), f"{mem}\n")
    if peak is not None:
        write(os.path.join(group, "memory.peak"), f"{peak}\n")
    write(os.path.join(group, "io.stat"), IO_STAT_V2)
    write(os.path.join(group, "pids.current"), f"{pids}\n")
    write(os.path.join(group, "cgroup.procs"), procs)
    return group


EXPECTED = {
    "cpu_used_ns": 2_500_000_000,
    "mem_bytes": 150 << 20,
    "mem_max_bytes": 200 << 20,
    "io_read_bytes": 1048576 + 10,
    "io_write_bytes": 4096 + 20,
    "net_rx_bytes": 1200 + 34,
    "net_tx_bytes": 800 + 66,
    "pids": 3,
    "pid": 42,
}


@pytest.fixture
def paths(tmp_path):
    root, proc = str(tmp_path / "cgroup"), str(tmp_path / "proc")
    os.makedirs(root)
    proc_with(proc, 42)
    return root, proc


# -- detection ----------------------------------------------------------------------


def test_a_unified_root_is_version_2(paths):
    root, _ = paths
    v2_tree(root, f"system.slice/docker-{CID}.scope")
    assert detect_cgroup_version(root) == 2


def test_a_hybrid_host_is_version_1(paths):
    root, _ = paths
    v1_tree(root, f"docker/{CID}")
    assert detect_cgroup_version(root) == 1


def test_the_version_is_detected_when_not_given(paths):
    root, proc = paths
    v2_tree(root, f"docker/{CID}")
    assert CgroupReader(root, proc=proc).version == 2


def test_a_version_other_than_1_or_2_is_refused(paths):
    root, proc = paths
    with pytest.raises(ValueError):
        CgroupReader(root, version=3, proc=proc)


# -- v1 ---------------------------------------------------------------------------------


def test_v1_cgroupfs_driver(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}")
    assert CgroupReader(root, version=1, proc=proc).read(CID) == EXPECTED


def test_v1_systemd_driver(paths):
    root, proc = paths
    v1_tree(root, f"system.slice/docker-{CID}.scope")
    assert CgroupReader(root, version=1, proc=proc).read(CID) == EXPECTED


def test_v1_co_mounted_cpu_and_cpuacct(paths):
    root, proc = paths
    mounts = {"cpuacct": "cpu,cpuacct", "memory": "memory", "blkio": "blkio", "pids": "pids"}
    v1_tree(root, f"docker/{CID}", mounts=mounts)
    assert CgroupReader(root, version=1, proc=proc).read(CID) == EXPECTED


def test_v1_cgroup_parent_with_cgroupfs(paths):
    root, proc = paths
    v1_tree(root, f"bai-kernels/{CID}")
    assert CgroupReader(root, version=1, proc=proc, parent="/bai-kernels").read(CID) == EXPECTED
    assert CgroupReader(root, version=1, proc=proc).read(CID) is None


def test_v1_cgroup_parent_slice_with_systemd(paths):
    root, proc = paths
    v1_tree(root, f"bai.slice/bai-kernels.slice/docker-{CID}.scope")
    assert CgroupReader(root, version=1, proc=proc, parent="bai-kernels.slice").read(CID) == EXPECTED


def test_v1_peak_is_never_below_the_current_use(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}", mem=300 << 20, mem_max=0)  # max reset by someone
    assert CgroupReader(root, version=1, proc=proc).read(CID)["mem_max_bytes"] == 300 << 20


def test_v1_empty_blkio_counts_zero(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}")
    write(os.path.join(root, "blkio", "docker", CID, "blkio.throttle.io_service_bytes"), "Total 0\n")
    reader = CgroupReader(root, version=1, proc=proc)
    sample = reader.read(CID)
    assert (sample["io_read_bytes"], sample["io_write_bytes"]) == (0, 0)
    assert reader.drain_problems() == []


# -- v2 ---------------------------------------------------------------------------------


def test_v2_cgroupfs_driver(paths):
    root, proc = paths
    v2_tree(root, f"docker/{CID}")
    assert CgroupReader(root, version=2, proc=proc).read(CID) == EXPECTED


def test_v2_systemd_driver(paths):
    root, proc = paths
    v2_tree(root, f"system.slice/docker-{CID}.scope")
    assert CgroupReader(root, version=2, proc=proc).read(CID) == EXPECTED


def test_v2_without_memory_peak_reports_the_current_use_as_peak(paths):
    root, proc = paths
    v2_tree(root, f"docker/{CID}", peak=None)
    reader = CgroupReader(root, version=2, proc=proc)
    assert reader.read(CID)["mem_max_bytes"] == 150 << 20
    assert reader.drain_problems() == []  # an old kernel is not a problem


def test_v2_io_stat_of_a_container_without_io(paths):
    root, proc = paths
    group = v2_tree(root, f"docker/{CID}")
    write(os.path.join(group, "io.stat"), "")
    sample = CgroupReader(root, version=2, proc=proc).read(CID)
    assert (sample["io_read_bytes"], sample["io_write_bytes"]) == (0, 0)


# -- containers that are not there, or go away -------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_a_container_without_a_cgroup_is_none(paths, version):
    root, proc = paths
    (v1_tree if version == 1 else v2_tree)(root, f"docker/{OTHER}")
    assert CgroupReader(root, version=version, proc=proc).read(CID) is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_vanished_cgroup_is_none_and_found_again_when_back(paths, version):
    root, proc = paths
    tree = v1_tree if version == 1 else v2_tree
    tree(root, f"docker/{CID}")
    reader = CgroupReader(root, version=version, proc=proc)
    assert reader.read(CID) is not None
    for name in os.listdir(root):
        shutil.rmtree(os.path.join(root, name, "docker"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, "docker"), ignore_errors=True)
    assert reader.read(CID) is None
    # The same id again (a container restarted under the other driver's layout).
    cpu = {"cpu_ns": 7_000_000} if version == 1 else {"usage_usec": 7000}
    tree(root, f"system.slice/docker-{CID}.scope", **cpu)
    assert reader.read(CID)["cpu_used_ns"] == 7_000_000


def test_v1_missing_memory_controller_dir_is_zero_and_one_problem(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}")
    shutil.rmtree(os.path.join(root, "memory", "docker", CID))
    reader = CgroupReader(root, version=1, proc=proc)
    sample = reader.read(CID)
    assert (sample["mem_bytes"], sample["mem_max_bytes"], sample["cpu_used_ns"]) == (0, 0, 2_500_000_000)
    problems = reader.drain_problems()
    assert problems and all(container == CID for container, _ in problems)
    reader.read(CID)
    assert reader.drain_problems() == []  # reported once, not every sample


def test_the_located_path_is_remembered(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}", cpu_ns=1000)
    reader = CgroupReader(root, version=1, proc=proc)
    assert reader.read(CID)["cpu_used_ns"] == 1000
    # A decoy at the second candidate is never looked at while the first one lives.
    v1_tree(root, f"system.slice/docker-{CID}.scope", cpu_ns=2000)
    assert reader.read(CID)["cpu_used_ns"] == 1000


# -- processes and network ------------------------------------------------------------------


def test_network_comes_from_the_next_process_when_the_first_exited(paths):
    root, proc = paths
    v1_tree(root, f"docker/{CID}", procs="41\n42\n")  # 41 has no /proc entry any more
    sample = CgroupReader(root, version=1, proc=proc).read(CID)
    assert (sample["pid"], sample["net_rx_bytes"], sample["net_tx_bytes"]) == (42, 1234, 866)


def test_a_container_without_a_network_counts_zero(paths):
    root, proc = paths
    proc_with(proc, 42, NET_DEV_LO_ONLY)
    v2_tree(root, f"docker/{CID}")
    sample = CgroupReader(root, version=2, proc=proc).read(CID)
    assert (sample["net_rx_bytes"], sample["net_tx_bytes"]) == (0, 0)


def test_a_cgroup_without_processes_has_no_pid_and_no_traffic(paths):
    root, proc = paths
    v2_tree(root, f"docker/{CID}", procs="", pids=0)
    sample = CgroupReader(root, version=2, proc=proc).read(CID)
    assert (sample["pid"], sample["pids"], sample["net_rx_bytes"], sample["net_tx_bytes"]) == (None, 0, 0, 0)


# -- junk --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_junk_counters_are_zero_and_reported_once(paths, version):
    root, proc = paths
    if version == 1:
        v1_tree(root, f"docker/{CID}")
        write(os.path.join(root, "memory", "docker", CID, "memory.usage_in_bytes"), "lots\n")
        write(os.path.join(root, "blkio", "docker", CID, "blkio.throttle.io_service_bytes"), "8:0 Read x\nnonsense\n")
    else:
        group = v2_tree(root, f"docker/{CID}")
        write(os.path.join(group, "memory.current"), "\x00\x01garbage")
        write(os.path.join(group, "io.stat"), "8:0 rbytes=x wbytes=-5 junk\n")
    proc_with(proc, 42, "header\nheader\n  eth0: 1 2 3\n")
    reader = CgroupReader(root, version=version, proc=proc)
    sample = reader.read(CID)
    assert sample["mem_bytes"] == 0
    assert (sample["io_read_bytes"], sample["io_write_bytes"]) == (0, 0)
    assert (sample["net_rx_bytes"], sample["net_tx_bytes"]) == (0, 0)
    assert sample["cpu_used_ns"] == 2_500_000_000  # the rest is still read
    assert len(reader.drain_problems()) >= 3
    assert reader.read(CID) == sample
    assert reader.drain_problems() == []


def test_junk_in_cgroup_procs_is_no_pid(paths):
    root, proc = paths
    v2_tree(root, f"docker/{CID}", procs="not-a-pid\n42\n")
    reader = CgroupReader(root, version=2, proc=proc)
    assert reader.read(CID)["pid"] is None
    assert reader.drain_problems()


@pytest.mark.parametrize("container_id", ["", "../../etc", "a/b", ".hidden", None, 42])
def test_container_ids_that_are_not_names_are_refused(paths, container_id):
    root, proc = paths
    with pytest.raises(ValueError):
        CgroupReader(root, version=2, proc=proc).read(container_id)


@pytest.mark.parametrize("parent", ["", "/", "a/../b", "..", "a b", 7])
def test_cgroup_parents_that_are_not_paths_are_refused(paths, parent):
    root, proc = paths
    with pytest.raises(ValueError):
        CgroupReader(root, version=1, proc=proc, parent=parent)


def test_candidates_cover_both_drivers():
    assert candidate_paths(CID) == [f"docker/{CID}", f"system.slice/docker-{CID}.scope"]
    assert candidate_paths(CID, "a-b.slice")[:2] == [f"a-b.slice/{CID}", f"a.slice/a-b.slice/docker-{CID}.scope"]
