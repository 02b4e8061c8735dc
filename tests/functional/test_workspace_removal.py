"""
The removal of a kernel's directories (``Workspace.remove``, ``remove_state_dirs_except``)
against what user code and a killed agent leave: a home thousands of levels deep with
symlinks out of it, and host directories still bind-mounted under a state dir. Needs root
(mounts, chattr), as the agent does.
"""

import os
import subprocess

import pytest

from bai_agent.kernels.workspace import Workspace, kernel_key, remove_state_dirs_except
from bai_agent.node import mounts
from tests.deep_trees import assert_intact, deep_chain, outside_tree, removes_deep_trees  # noqa: F401

pytestmark = pytest.mark.functional


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "state").mkdir()
    workspace = Workspace(str(tmp_path / "scratch"), str(tmp_path / "state"), "k1")
    workspace.create()
    return workspace


def bind(source, point):
    os.makedirs(point, exist_ok=True)
    mounts.mount(str(source), str(point), None, mounts.MS_BIND)


def unmount_all(root):
    for point in mounts.mount_points_under(str(root)):
        mounts.unmount(point, lazy=True)


def test_a_3000_deep_home_with_symlinks_out_is_removed(workspace, tmp_path):
    outside = outside_tree(tmp_path)
    deep_chain(workspace.scratch_dir, 3000, every=500)
    os.symlink("/", os.path.join(workspace.scratch_dir, "root"))
    os.symlink(str(outside), os.path.join(workspace.scratch_dir, "d", "outside"))
    workspace.remove()
    assert not os.path.lexists(workspace.scratch_dir)
    assert not os.path.lexists(workspace.state_dir)
    assert_intact(outside)


def test_a_pin_a_killed_agent_left_is_unmounted_never_emptied(workspace, tmp_path):
    outside = outside_tree(tmp_path)
    bind(outside, os.path.join(workspace.state_dir, "mounts", "0"))
    try:
        workspace.remove()
        assert not os.path.lexists(workspace.state_dir)
        assert_intact(outside)
    finally:
        unmount_all(tmp_path / "state")


def test_something_else_mounted_in_a_state_dir_is_left_and_reported(workspace, tmp_path):
    outside = outside_tree(tmp_path)
    bind(outside, os.path.join(workspace.run_dir, "data"))
    try:
        with pytest.raises(OSError, match="mount point"):
            workspace.remove()
        assert_intact(outside)
        assert not os.path.lexists(workspace.scratch_dir)  # the home went all the same
    finally:
        unmount_all(tmp_path / "state")


def test_a_home_that_keeps_a_file_raises_after_removing_the_rest(workspace):
    stuck = os.path.join(workspace.scratch_dir, "stuck")
    with open(stuck, "w") as f:
        f.write("x")
    subprocess.run(["chattr", "+i", stuck], check=True)
    try:
        with pytest.raises(OSError, match="stuck"):
            workspace.remove()
        assert not os.path.lexists(workspace.state_dir)
    finally:
        subprocess.run(["chattr", "-i", stuck], check=True)
    workspace.remove()
    assert not os.path.lexists(workspace.scratch_dir)


def test_unexplained_state_dirs_are_removed_without_emptying_their_pins(tmp_path):
    outside = outside_tree(tmp_path)
    state = tmp_path / "state"
    kept = state / "kernels" / kernel_key("kept")
    kept.mkdir(parents=True)
    # A create killed after it pinned its mounts and before it saved kernel.json.
    interrupted = state / "kernels" / kernel_key("interrupted")
    (interrupted / "run").mkdir(parents=True)
    deep_chain(str(interrupted / "run"), 3000)
    bind(outside, interrupted / "mounts" / "0")
    try:
        removed = remove_state_dirs_except(str(state), {kernel_key("kept")})
        assert removed == [kernel_key("interrupted")]
        assert os.listdir(state / "kernels") == [kernel_key("kept")]
        assert_intact(outside)
    finally:
        unmount_all(state)


def test_a_state_dir_that_must_be_left_does_not_stop_the_others(tmp_path):
    outside = outside_tree(tmp_path)
    state = tmp_path / "state"
    for name in ("a", "b", "c"):
        (state / "kernels" / kernel_key(name) / "run").mkdir(parents=True)
    bind(outside, state / "kernels" / kernel_key("b") / "run" / "data")
    try:
        with pytest.raises(OSError, match="mount point"):
            remove_state_dirs_except(str(state), set())
        assert os.listdir(state / "kernels") == [kernel_key("b")]
        assert_intact(outside)
    finally:
        unmount_all(state)
