"""
A kernel ends whatever its home holds: the registry's ``_finish`` on the fake backend, with
a home user code made thousands of levels deep, and with a removal that fails in ways
nobody foresaw. The grant is released, the id freed, ``kernel-terminated`` journaled.
"""

import os

import pytest

from bai_agent.kernels.workspace import Workspace
from bai_agent.testing.deferreds import result_of
from tests.deep_trees import deep_chain, removes_deep_trees  # noqa: F401 (autouse)
from tests.unit.test_kernel_registry import Harness, restarted


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_a_kernel_whose_home_is_5000_deep_ends_and_frees_everything(h):
    h.create()
    home = h.registry.workspace("k1").scratch_dir
    deep_chain(home, 5000, every=1000)
    os.symlink("/", os.path.join(home, "root"))
    answer = result_of(h.registry.destroy("k1"))
    assert answer["kernel_id"] == "k1"
    h.assert_nothing_leaked()
    (terminated,) = h.events("kernel-terminated")
    assert terminated.kernel_id == "k1" and terminated.data["reason"] == "user-requested"
    assert h.create()["status"] == "running"  # the id is free again


@pytest.mark.parametrize(
    "error", [RecursionError("maximum recursion depth exceeded"), OSError(39, "not empty"), ValueError("odd")]
)
def test_a_removal_that_raises_never_keeps_the_grant_or_the_id(h, monkeypatch, error):
    h.create()

    def failing_remove(self):
        raise error

    monkeypatch.setattr(Workspace, "remove", failing_remove)
    assert result_of(h.registry.destroy("k1"))["kernel_id"] == "k1"
    assert h.registry.kernels == {}
    assert h.allocator.used() == {"cpu": 0, "mem": 0, "cuda.device": 0}
    assert [event.kernel_id for event in h.events("kernel-terminated")] == ["k1"]
    monkeypatch.undo()
    h.registry.workspace("k1").remove()  # what the failed removal left, as a later one would
    assert h.create()["status"] == "running"


def test_after_a_restart_a_deep_home_left_behind_is_removed_and_reported(h):
    # The kernel died while no agent watched; its home is 5,000 levels deep, and a home
    # without any kernel is too.
    died = h.create("died")
    deep_chain(h.registry.workspace("died").scratch_dir, 5000)
    registry = restarted(h)
    h.backend.die(died["container_id"], 1)
    os.mkdir(os.path.join(h.config.scratch_root, "homeless"))
    deep_chain(os.path.join(h.config.scratch_root, "homeless"), 5000)
    registry.startService()
    assert os.listdir(h.config.scratch_root) == []
    ended = {e.kernel_id: e.data["reason"] for e in h.journal.since(0) if e.type == "kernel-terminated"}
    assert ended == {"died": "self-terminated", "homeless": "orphan-cleanup"}
    h.assert_nothing_leaked()
