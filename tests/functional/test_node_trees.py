"""
remove_tree on real directories in tmp_path, against what user code can leave in a home:
deep chains, symlinks (planted, or swapped in mid-walk), unreadable directories, odd
names, many files, mounts inside, files that cannot go, and a writer still at work.
The mount and chattr tests need root (as the agent runs).
"""

import os
import subprocess
import tempfile
import tracemalloc

import pytest

from bai_agent.node import mounts, trees
from bai_agent.node.trees import TreeNotRemoved, remove_tree
from tests.deep_trees import assert_intact, deep_chain, open_fds, outside_tree, removes_deep_trees  # noqa: F401 (autouse)

pytestmark = pytest.mark.functional


def test_a_10000_deep_tree_is_removed_with_a_bounded_number_of_fds(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    deep_chain(str(home), 10_000, every=1000)
    before = open_fds()
    most = []
    scandir = os.scandir

    calls = []

    def counting_scandir(fd):
        calls.append(fd)
        if len(calls) % 50 == 0:
            most.append(open_fds())
        return scandir(fd)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    removal = remove_tree(str(home))
    assert removal.removed and removal.failures == () and removal.mount_points == ()
    assert not home.exists()
    assert max(most) - before <= 2 * trees.MAX_OPEN + 4  # not one per level
    assert open_fds() == before


def test_symlinks_are_removed_never_followed(tmp_path):
    outside = outside_tree(tmp_path)
    home = tmp_path / "home"
    (home / "a" / "b").mkdir(parents=True)
    os.symlink(outside, home / "a" / "to-outside")
    os.symlink("/", home / "a" / "b" / "to-root")
    os.symlink(outside / "keep.txt", home / "to-file")
    os.symlink("../../..", home / "a" / "up")
    os.symlink("nowhere", home / "dangling")
    removal = remove_tree(str(home))
    assert removal.removed
    assert not home.exists()
    assert_intact(outside)
    assert os.path.isdir("/etc")


def test_a_root_that_is_a_symlink_is_unlinked_not_followed(tmp_path):
    outside = outside_tree(tmp_path)
    os.symlink(outside, tmp_path / "home")
    assert remove_tree(str(tmp_path / "home")).removed
    assert not os.path.lexists(tmp_path / "home")
    assert_intact(outside)


def test_what_is_already_gone_is_removed(tmp_path):
    assert remove_tree(str(tmp_path / "never-made")).removed
    assert remove_tree(str(tmp_path / "no" / "parent")).removed


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_followed(tmp_path, monkeypatch):
    outside = outside_tree(tmp_path)
    home = tmp_path / "home"
    (home / "victim" / "inner").mkdir(parents=True)
    (home / "victim" / "inner" / "f").write_text("x")
    real_open = os.open
    swapped = []

    def swapping_open(path, flags, *args, dir_fd=None, **kwargs):
        # User code swaps the directory for a symlink after it was listed, before it is
        # opened: the moment a path-based walk would follow it.
        if path == "victim" and dir_fd is not None and not swapped:
            swapped.append(True)
            os.rename(home / "victim", home / "victim.moved")
            os.symlink(outside, home / "victim")
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)
    removal = remove_tree(str(home))
    monkeypatch.undo()
    assert swapped
    assert removal.removed, removal
    assert not home.exists()
    assert_intact(outside)


def test_a_directory_moved_up_mid_walk_restarts_the_walk_not_escapes(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    deep_chain(str(home), 3 * trees.MAX_OPEN)
    outside = outside_tree(tmp_path)
    real_open = os.open
    moved = []

    def moving_open(path, flags, *args, dir_fd=None, **kwargs):
        # The first time the walk goes back up through '..', the level it is coming back
        # to has been moved: its '..' is now another directory.
        if path == ".." and not moved:
            moved.append(True)
            os.rename(home / "d" / "d", home / "moved")
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "open", moving_open)
    removal = remove_tree(str(home))
    monkeypatch.undo()
    assert moved
    assert removal.removed, removal
    assert not home.exists()
    assert_intact(outside)


def test_odd_names_are_removed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in (b"\xff\xfe not utf-8", b"new\nline", b"-rf", b" ", b"x" * 255, "é".encode(), b"\x01\x1b[2J"):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=sub))
            os.close(sub)
    finally:
        os.close(fd)
    removal = remove_tree(str(home))
    assert removal.removed, removal
    assert not home.exists()


def test_unreadable_and_unwritable_directories_of_the_kernel_user_are_removed(tmp_path):
    home = tmp_path / "home"
    (home / "locked" / "deeper").mkdir(parents=True)
    (home / "locked" / "deeper" / "f").write_text("x")
    (home / "readonly").mkdir()
    (home / "readonly" / "f").write_text("x")
    (home / "noexec").mkdir()
    (home / "noexec" / "f").write_text("x")
    for path, mode in (
        (home / "locked" / "deeper", 0o000),
        (home / "locked", 0o000),
        (home / "readonly", 0o500),
        (home / "noexec", 0o600),
    ):
        os.chmod(path, mode)
    # root removes them anyway; a remover without CAP_DAC_OVERRIDE makes them 0700 first.
    assert remove_tree(str(home)).removed
    assert not home.exists()


def test_a_remover_without_dac_override_opens_up_mode_000_directories(tmp_path):
    # As the kernel user itself (uid 1000), in a child process: no DAC override, so every
    # locked directory must be made 0700 through its descriptor before it can be emptied.
    base = tempfile.mkdtemp(prefix="trees-uid-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        home = os.path.join(base, "home")
        os.makedirs(os.path.join(home, "locked", "deeper"))
        os.makedirs(os.path.join(home, "readonly"))
        for path in (os.path.join(home, "locked", "deeper", "f"), os.path.join(home, "readonly", "f")):
            with open(path, "w") as f:
                f.write("x")
        deep_chain(os.path.join(home, "locked", "deeper"), 50)
        for directory, dirnames, filenames in os.walk(home):
            for name in dirnames + filenames:
                os.lchown(os.path.join(directory, name), 1000, 1000)
        os.chown(home, 1000, 1000)
        os.chmod(os.path.join(home, "locked", "deeper"), 0o000)
        os.chmod(os.path.join(home, "locked"), 0o000)
        os.chmod(os.path.join(home, "readonly"), 0o500)
        os.chmod(base, 0o777)
        pid = os.fork()
        if pid == 0:  # the child: the kernel user, no other group, then the removal
            try:
                os.setgroups([])
                os.setgid(1000)
                os.setuid(1000)
                os._exit(0 if remove_tree(home).removed else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not os.path.exists(home)
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


def test_200000_files_are_removed_in_bounded_memory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # Hard links make 200,000 names quickly (50,000 per inode, under ext4's limit).
    for d in range(4):
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
        os.mkdir(f"d{d}", dir_fd=fd)
        sub = os.open(f"d{d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        os.close(os.open("0", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=sub))
        for i in range(1, 50_000):
            os.link("0", str(i), src_dir_fd=sub, dst_dir_fd=sub)
        os.close(sub)
    tracemalloc.start()
    try:
        removal = remove_tree(str(home))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert removal.removed
    assert not home.exists()
    assert peak < 1 << 20  # nothing kept per entry


def test_a_bind_mount_inside_is_reported_and_never_emptied(tmp_path):
    outside = outside_tree(tmp_path)
    home = tmp_path / "home"
    (home / "a" / "pin").mkdir(parents=True)
    (home / "a" / "file").write_text("x")
    (home / "other").mkdir()
    (home / "other" / "f").write_text("x")
    # The same filesystem: st_dev alone cannot tell; the mount id does.
    mounts.mount(str(outside), str(home / "a" / "pin"), None, mounts.MS_BIND)
    try:
        removal = remove_tree(str(home))
        assert not removal.removed
        assert removal.mount_points == (str(home / "a" / "pin"),)
        assert_intact(outside)
        assert not (home / "other").exists() and not (home / "a" / "file").exists()
        with pytest.raises(TreeNotRemoved, match="mount point"):
            removal.check()
    finally:
        mounts.unmount(str(home / "a" / "pin"))
    assert remove_tree(str(home)).removed
    assert_intact(outside)


def test_another_filesystem_mounted_inside_is_never_emptied(tmp_path):
    home = tmp_path / "home"
    (home / "tmpfs").mkdir(parents=True)
    mounts.mount("tmpfs", str(home / "tmpfs"), "tmpfs", 0, "size=1m")
    try:
        (home / "tmpfs" / "kept").write_text("kept")
        removal = remove_tree(str(home))
        assert not removal.removed and removal.mount_points == (str(home / "tmpfs"),)
        assert (home / "tmpfs" / "kept").read_text() == "kept"
    finally:
        mounts.unmount(str(home / "tmpfs"))
    assert remove_tree(str(home)).removed


def test_an_immutable_file_is_reported_and_the_rest_removed(tmp_path):
    home = tmp_path / "home"
    (home / "a").mkdir(parents=True)
    (home / "a" / "stuck").write_text("x")
    (home / "b").mkdir()
    (home / "b" / "f").write_text("x")
    subprocess.run(["chattr", "+i", str(home / "a" / "stuck")], check=True)
    try:
        removal = remove_tree(str(home))
        assert not removal.removed
        assert len(removal.failures) == 1 and "stuck" in removal.failures[0]
        assert sorted(os.listdir(home)) == ["a"] and os.listdir(home / "a") == ["stuck"]
    finally:
        subprocess.run(["chattr", "-i", str(home / "a" / "stuck")], check=True)
    assert remove_tree(str(home)).removed


def test_entries_made_meanwhile_are_removed_too(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "busy").mkdir(parents=True)
    (home / "busy" / "f").write_text("x")
    real_rmdir = os.rmdir
    writes = []

    def rmdir_after_a_write(path, *args, dir_fd=None):
        # A writer still at work: each of the first attempts finds a new file in "busy".
        if path == "busy" and len(writes) < 3:
            writes.append(True)
            (home / "busy" / f"new{len(writes)}").write_text("x")
        return real_rmdir(path, *args, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir_after_a_write)
    removal = remove_tree(str(home))
    monkeypatch.undo()
    assert len(writes) == 3
    assert removal.removed
    assert not home.exists()


def test_a_writer_that_never_stops_does_not_hold_the_removal_for_ever(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "busy").mkdir(parents=True)
    real_rmdir = os.rmdir
    writes = []

    def rmdir_after_a_write(path, *args, dir_fd=None):
        if path in ("busy", "home"):
            writes.append(True)
            (home / "busy" / f"new{len(writes)}").write_text("x")
        return real_rmdir(path, *args, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir_after_a_write)
    removal = remove_tree(str(home))
    monkeypatch.undo()
    assert not removal.removed
    assert any("keeps being filled" in failure for failure in removal.failures)
    assert len(writes) < 100


def test_what_is_left_near_the_top_of_a_deep_tree_is_reported_once(tmp_path):
    # The top level is listed again after the walk comes back from past MAX_OPEN levels:
    # what it left there is met twice, and reported once.
    outside = outside_tree(tmp_path)
    home = tmp_path / "home"
    (home / "pin").mkdir(parents=True)
    (home / "stuck").write_text("x")
    deep_chain(str(home), 4 * trees.MAX_OPEN)
    subprocess.run(["chattr", "+i", str(home / "stuck")], check=True)
    mounts.mount(str(outside), str(home / "pin"), None, mounts.MS_BIND)
    try:
        removal = remove_tree(str(home))
        assert not removal.removed
        assert removal.mount_points == (str(home / "pin"),)
        assert len(removal.failures) == 1 and "stuck" in removal.failures[0]
        assert sorted(os.listdir(home)) == ["pin", "stuck"]
        assert_intact(outside)
    finally:
        mounts.unmount(str(home / "pin"))
        subprocess.run(["chattr", "-i", str(home / "stuck")], check=True)
    assert remove_tree(str(home)).removed
