"""ScratchSizer: an incremental du of a kernel's home, on real directories in tmp_path."""

import itertools
import os
import shutil

import pytest

from bai_agent.node.trees import remove_tree
from bai_agent.stats.scratch import ScratchSizer


def du(path):
    """The reference: one full walk, st_blocks * 512, hard links once, no symlink followed."""
    seen = set()
    total = os.lstat(path).st_blocks * 512
    for directory, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(directory, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(directory, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def fill(path, size):
    with open(path, "wb") as f:
        f.write(b"x" * size)
        f.flush()
        os.fsync(f.fileno())


def step_until_complete(sizer, limit=10_000):
    steps = 0
    while not sizer.complete:
        sizer.step()
        steps += 1
        assert steps < limit, "the walk never completed"
    return steps


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """20,000 small files in 20 directories (some nested), made once for the module."""
    home = tmp_path_factory.mktemp("home")
    for d in range(20):
        directory = home / f"d{d}" / ("nested" if d % 3 == 0 else "")
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            (directory / f"f{i}").write_bytes(b"x" * (i % 7 * 700))
    return str(home)


def test_a_walk_in_small_budgets_totals_what_a_full_walk_does(many_files):
    sizer = ScratchSizer(many_files, max_entries=1000)
    steps = step_until_complete(sizer)
    assert steps > 10  # 20,000+ entries at 1,000 per step
    assert sizer.bytes == du(many_files)
    assert sizer.walks == 1


def test_before_the_first_walk_completes_the_running_total_grows(many_files):
    sizer = ScratchSizer(many_files, max_entries=2000)
    partials = []
    while not sizer.complete:
        partials.append((sizer.step(), sizer.complete))
    totals = [total for total, complete in partials if not complete]
    assert len(totals) > 3
    assert totals == sorted(totals)
    assert totals[-1] < sizer.bytes


def test_later_walks_report_the_last_complete_total(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for i in range(50):
        fill(home / f"f{i}", 8192)
    sizer = ScratchSizer(str(home), max_entries=10)
    step_until_complete(sizer)
    first = sizer.bytes
    assert first == du(str(home))
    for i in range(50):
        fill(home / f"g{i}", 8192)
    # The second walk is under way: the reported size stays the first walk's total...
    sizer.step()
    assert (sizer.bytes, sizer.complete) == (first, True)
    # ... until it completes.
    while sizer.walks < 2:
        sizer.step()
    assert sizer.bytes == du(str(home)) > first


def test_a_time_budget_stops_a_step(many_files):
    ticks = itertools.count()
    sizer = ScratchSizer(many_files, max_entries=10**9, max_seconds=5, timer=lambda: float(next(ticks)))
    sizer.step()  # the timer says 1 s per look: past 5 s at the first check, after 256 entries
    assert not sizer.complete
    assert 0 < sizer.bytes < du(many_files)


def test_hard_links_count_once(tmp_path):
    home = tmp_path / "home"
    (home / "a").mkdir(parents=True)
    fill(home / "a" / "big", 1 << 20)
    os.link(home / "a" / "big", home / "a" / "again")
    os.link(home / "a" / "big", home / "also")
    sizer = ScratchSizer(str(home))
    step_until_complete(sizer)
    one_copy = sum(os.lstat(path).st_blocks * 512 for path in (home, home / "a", home / "a" / "big"))
    assert sizer.bytes == one_copy
    assert (1 << 20) <= sizer.bytes < 2 << 20


def test_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    fill(outside / "huge", 4 << 20)
    home = tmp_path / "home"
    home.mkdir()
    fill(home / "small", 4096)
    os.symlink(outside, home / "to-dir")
    os.symlink(outside / "huge", home / "to-file")
    os.symlink(home, home / "loop")
    sizer = ScratchSizer(str(home))
    step_until_complete(sizer)
    assert sizer.bytes == du(str(home))
    assert sizer.bytes < 1 << 20


def test_files_and_dirs_vanishing_mid_walk_are_fine(tmp_path):
    home = tmp_path / "home"
    for d in range(10):
        (home / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (home / f"d{d}" / f"f{i}").write_bytes(b"x" * 4096)
    sizer = ScratchSizer(str(home), max_entries=150)
    sizer.step()
    sizer.step()
    for d in range(0, 10, 2):
        shutil.rmtree(home / f"d{d}")
    for i in range(50):
        os.unlink(home / "d1" / f"f{i}")
    step_until_complete(sizer)  # no exception, a total
    assert 0 < sizer.bytes
    # The next complete walk sees the tree as it is now.
    while sizer.walks < 2:
        sizer.step()
    assert sizer.bytes == du(str(home))


def test_a_missing_home_is_zero(tmp_path):
    sizer = ScratchSizer(str(tmp_path / "never-made"))
    assert sizer.step() == 0
    assert sizer.complete


def test_a_home_removed_mid_walk_is_counted_without_error(tmp_path):
    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)
    for i in range(100):
        (home / "d" / f"f{i}").write_bytes(b"x" * 4096)
    sizer = ScratchSizer(str(home), max_entries=5)
    sizer.step()
    shutil.rmtree(home)
    step_until_complete(sizer)
    while sizer.walks < 2:
        sizer.step()
    assert sizer.bytes == 0


def test_a_step_while_another_thread_steps_returns_at_once(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fill(home / "f", 8192)
    sizer = ScratchSizer(str(home))
    sizer._lock.acquire()  # another thread in the middle of a step
    try:
        assert sizer.step() == 0
        assert not sizer.complete
    finally:
        sizer._lock.release()
    step_until_complete(sizer)
    assert sizer.bytes == du(str(home))


def test_close_releases_the_open_directory(many_files):
    sizer = ScratchSizer(many_files, max_entries=10)
    sizer.step()
    assert sizer._entries is not None
    sizer.close()
    assert sizer._entries is None


@pytest.mark.parametrize(
    "kwargs", [{"path": ""}, {"path": None}, {"path": "/x", "max_entries": 0}, {"path": "/x", "max_seconds": 0}]
)
def test_nonsense_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ScratchSizer(**kwargs)


def test_close_during_a_step_is_done_by_that_step(many_files):
    close_inside = []

    def timer():
        # Called inside step(), while it holds the lock: as if another thread closed now.
        if close_inside:
            close_inside.clear()
            sizer.close()
        return 0.0

    sizer = ScratchSizer(many_files, max_entries=10, timer=timer)
    sizer.step()
    assert sizer._entries is not None  # a walk under way, its directory open
    close_inside.append(True)
    sizer.step()  # close() comes in the middle of this step and does not wait for it
    assert sizer._entries is None and not sizer._walking


def test_a_queued_directory_swapped_for_a_symlink_is_not_followed(tmp_path):
    # User code swaps a directory the sizer has queued for a symlink to a big host tree
    # between two steps: once the agent (root) walked that tree and counted 18 GiB.
    home = tmp_path / "home"
    outside = tmp_path / "host"
    (outside / "deep").mkdir(parents=True)
    fill(outside / "deep" / "big", 4 << 20)
    for index in range(50):
        (home / f"d{index}").mkdir(parents=True)
    fill(home / "small", 4096)
    sizer = ScratchSizer(str(home), max_entries=10)
    sizer.step()  # the home's entries are being listed; the subdirectories are queued
    for index in range(50):
        os.rmdir(home / f"d{index}")
        os.symlink(outside, home / f"d{index}")
    step_until_complete(sizer)
    assert sizer.bytes < 1 << 20
    for _ in range(20):  # and the walks after it, which see the links from the start
        sizer.step()
    assert sizer.walks > 1 and sizer.bytes < 1 << 20


def test_a_queued_directory_whose_parent_is_swapped_is_not_followed(tmp_path):
    home = tmp_path / "home"
    (home / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "host"
    (outside / "b").mkdir(parents=True)
    fill(outside / "b" / "big", 4 << 20)
    sizer = ScratchSizer(str(home), max_entries=1)
    sizer.step()
    sizer.step()
    # "a/b" is queued; its parent is swapped for a link to a host tree with a "b" in it.
    os.rename(home / "a", tmp_path / "moved")
    os.symlink(outside, home / "a")
    step_until_complete(sizer)
    assert sizer.bytes < 1 << 20


def test_a_deep_tree_is_sized_without_recursion_and_with_few_open_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fd = os.open(home, os.O_RDONLY)
    expected = os.fstat(fd).st_blocks * 512
    for _ in range(3000):  # deeper than Python's recursion, longer than PATH_MAX as a path
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
        expected += os.fstat(fd).st_blocks * 512
    os.close(fd)
    try:
        before = len(os.listdir("/proc/self/fd"))
        sizer = ScratchSizer(str(home), max_entries=500)
        while not sizer.complete:
            sizer.step()
            assert len(os.listdir("/proc/self/fd")) <= before + 3
        assert sizer.bytes == expected
        sizer.close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        remove_tree(str(home))  # pytest's own clean-up (shutil.rmtree) would recurse
