"""
Deep trees and what must survive their removal, for the tests of ``remove_tree`` and of
the ends of kernels whose homes hold them.
"""

import os

import pytest

from bai_agent.node.trees import remove_tree


@pytest.fixture(autouse=True)
def removes_deep_trees(tmp_path):
    """What a test leaves in tmp_path goes with it: pytest's own rmtree of old tmp dirs
    would raise RecursionError on a deep tree, in every later session."""
    yield
    remove_tree(str(tmp_path))


def deep_chain(root, depth, name="d", every=0):
    """``root/d/d/...`` ``depth`` levels deep, made fd-relative (paths that long cannot be
    named); a file in every ``every``-th level."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir(name, dir_fd=fd)
            if every and level % every == 0:
                os.close(os.open(f"f{level}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def outside_tree(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    (outside / "sub" / "also.txt").write_text("also")
    return outside


def assert_intact(outside):
    assert (outside / "keep.txt").read_text() == "keep"
    assert (outside / "sub" / "also.txt").read_text() == "also"
