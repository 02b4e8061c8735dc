"""CgroupLimits on fake cgroup trees (v1 and v2): what a warm claim writes, and in what order."""

import os

import pytest

from bai_agent.kernels.allocator import Grant
from bai_agent.kernels.cgroup_limits import CgroupLimits, CgroupLimitsError

CID = "c" * 64


def tree(root, files):
    for path, value in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(value)


def v1(tmp_path, mem=256 << 20):
    files = {
        f"memory/docker/{CID}/memory.limit_in_bytes": str(mem),
        f"memory/docker/{CID}/memory.memsw.limit_in_bytes": str(mem),
        f"cpu,cpuacct/docker/{CID}/cpu.cfs_quota_us": "-1",
        f"cpu,cpuacct/docker/{CID}/cpu.cfs_period_us": "100000",
        f"cpuset/docker/{CID}/cpuset.cpus": "0-3",
        "unified/.keep": "",
    }
    tree(tmp_path, files)
    return tmp_path


def test_v1_pinned_grant(tmp_path, monkeypatch):
    root = v1(tmp_path)
    written = []
    import bai_agent.kernels.cgroup_limits as module

    original = module._write
    monkeypatch.setattr(
        module, "_write", lambda path, value: (written.append(os.path.basename(path)), original(path, value))
    )
    CgroupLimits(str(root)).apply(CID, Grant(kernel_id="k", cpu=2.0, mem=128 << 20, cpuset=(1, 2)))
    memory = root / "memory/docker" / CID
    assert (memory / "memory.limit_in_bytes").read_text() == str(128 << 20)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(128 << 20)
    assert (root / "cpuset/docker" / CID / "cpuset.cpus").read_text() == "1,2"
    # Lowering: the limit before memory+swap (which may never be below it).
    assert written[:2] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v1_raising_memory_sets_swap_first_and_quota(tmp_path, monkeypatch):
    root = v1(tmp_path)
    written = []
    import bai_agent.kernels.cgroup_limits as module

    original = module._write
    monkeypatch.setattr(
        module, "_write", lambda path, value: (written.append(os.path.basename(path)), original(path, value))
    )
    CgroupLimits(str(root)).apply(CID, Grant(kernel_id="k", cpu=0.5, mem=1 << 30, cpu_quota_us=50000))
    assert written[:2] == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    cpu = root / "cpu,cpuacct/docker" / CID
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (root / "cpuset/docker" / CID / "cpuset.cpus").read_text() == "0-3"  # not pinned: left alone


def test_v2(tmp_path):
    tree(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory",
            f"system.slice/docker-{CID}.scope/memory.max": "max",
            f"system.slice/docker-{CID}.scope/memory.swap.max": "max",
            f"system.slice/docker-{CID}.scope/cpu.max": "max 100000",
        },
    )
    CgroupLimits(str(tmp_path)).apply(CID, Grant(kernel_id="k", cpu=0.5, mem=64 << 20, cpu_quota_us=50000))
    scope = tmp_path / f"system.slice/docker-{CID}.scope"
    assert (scope / "memory.max").read_text() == str(64 << 20)
    assert (scope / "memory.swap.max").read_text() == "0"
    assert (scope / "cpu.max").read_text() == "50000 100000"


def test_a_missing_cgroup_or_a_bad_id_is_an_error(tmp_path):
    limits = CgroupLimits(str(v1(tmp_path)))
    with pytest.raises(CgroupLimitsError):
        limits.apply("d" * 64, Grant(kernel_id="k", cpu=1.0, mem=1 << 20))
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(CgroupLimitsError):
            limits.apply(bad, Grant(kernel_id="k", cpu=1.0, mem=1 << 20))
