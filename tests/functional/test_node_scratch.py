"""
ScratchVolumes on real directories: which kind the scratch root allows, and homes made
from per-kernel images (``hostfile``: needs root and loop devices, as the agent does).
"""

import os
import subprocess

import pytest

from bai_agent.kernels.workspace import Workspace
from bai_agent.node import mounts, scratch
from bai_agent.node.scratch import ScratchVolumes, detect

pytestmark = pytest.mark.functional


MIB = 1 << 20


def test_the_kind_follows_what_the_scratch_root_can_do(tmp_path):
    # This machine's filesystems have no project quotas: auto falls back to images.
    assert scratch.quota_unsupported(str(tmp_path))
    assert detect(str(tmp_path), "auto").kind == "hostfile"
    assert detect(str(tmp_path), "hostfile").kind == "hostfile"
    plain = detect(str(tmp_path), "dir")
    assert plain.kind == "dir" and not plain.enforced
    with pytest.raises(ValueError, match="--scratch-type quota: .*prjquota"):
        detect(str(tmp_path), "quota")
    with pytest.raises(ValueError, match="unknown scratch type"):
        detect(str(tmp_path), "zfs")


def test_mount_containing_reads_the_filesystem_and_its_options(tmp_path):
    entry = mounts.mount_containing(str(tmp_path))
    assert entry.fstype and entry.options and tmp_path.as_posix().startswith(entry.point)
    assert mounts.mount_containing("/proc/self").fstype == "proc"


def test_a_hostfile_home_is_its_own_filesystem_of_the_grant_and_goes_completely(tmp_path):
    volumes = ScratchVolumes(str(tmp_path), "hostfile")
    workspace = Workspace(str(tmp_path), str(tmp_path / "state"), "k1", volumes)
    home = workspace.scratch_dir
    workspace.create()
    workspace.limit_home(64 * MIB)
    try:
        assert mounts.is_mount_point(home)
        info = os.statvfs(home)
        assert 50 * MIB < info.f_blocks * info.f_frsize <= 64 * MIB
        assert os.listdir(home) == []  # no lost+found
        assert (os.stat(home).st_uid, os.stat(home).st_gid) == (1000, 1000)
        image = volumes.image_path(home)
        assert os.stat(image).st_blocks * 512 < 16 * MIB  # sparse
        assert volumes.used(home) < 8 * MIB
        with pytest.raises(FileExistsError):
            workspace.create()  # a home is never made twice
    finally:
        volumes.remove(home)
    assert not mounts.is_mount_point(home) and not os.path.exists(image)
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert image not in listing
    os.rmdir(home)


def test_images_of_no_home_are_removed(tmp_path):
    volumes = ScratchVolumes(str(tmp_path), "hostfile")
    os.makedirs(volumes.volumes_dir)
    kept = volumes.image_path(str(tmp_path / "alive"))
    stray = volumes.image_path(str(tmp_path / "half-made"))
    for path in (kept, stray):
        open(path, "w").close()
    assert volumes.remove_images_except([str(tmp_path / "alive")]) == [stray]
    assert os.listdir(volumes.volumes_dir) == [os.path.basename(kept)]
