"""
The warm pool (docs/protocol.md section 9) on the fake Docker backend and fake runners:
filling, claims (limits, name, directories, environment), what goes cold, the end of warm
kernels, failures in the middle of a claim, and the take-over of a killed agent's pool and
of claims it was cut off in.
"""

import json
import os

import pytest

from bai_agent.kernels.workspace import PoolWorkspace, kernel_key
from bai_agent.protocol import errors
from bai_agent.testing.deferreds import result_of
from tests.unit.test_kernel_registry import IMAGE, Harness, restarted

AGENT = "a1"


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.registry.pool.set_targets({IMAGE: 2})
    return harness


def pool_containers(h):
    return [
        c for c in h.containers() if c["Labels"].get("ai.backend.pool") == "1" and c["Names"][0].startswith("/pool.")
    ]


def kernel_containers(h):
    return [c for c in h.containers() if c["Names"][0].startswith("/kernel.")]


def commit_claim(entry, kernel_id):
    """What a claim writes first, its commit: the kernel's state in the pool container's state dir."""
    state = {
        "kernel_id": kernel_id,
        "image": IMAGE,
        "image_id": entry.image.id,
        "container_id": entry.container_id,
        "created_at": 0,
        "resources": {"cpu": 1, "mem": 256 << 20, "cpuset": "0", "cuda.device": [], "scratch": 0},
        "environ": {},
        "mounts": [],
        "idle_timeout": 0,
        "exec_timeout": 0,
        "warm": True,
        "pool_id": entry.pool_id,
    }
    with open(entry.workspace.claim_file, "w") as f:
        json.dump(state, f)


def create(h, kernel_id="k1", **kwargs):
    return result_of(
        h.registry.create(
            kernel_id, kwargs.pop("image", IMAGE), kwargs.pop("resources", {"cpu": 1, "mem": "256m"}), **kwargs
        )
    )


def test_the_pool_fills_to_its_target_without_grants_or_kernels(h):
    assert len(pool_containers(h)) == 2
    assert h.registry.kernels == {} and h.registry.records() == []
    assert h.allocator.used()["cpu"] == 0
    [state] = h.registry.pool_state()["images"].values()
    assert state == {"target": 2, "ready": 2, "filling": 0, "removing": 0}
    for container in pool_containers(h):
        labels = container["Labels"]
        assert labels["ai.backend.agent-id"] == AGENT and "ai.backend.kernel-id" not in labels
        pool_id = labels["ai.backend.pool-id"]
        assert os.path.isdir(os.path.join(h.config.scratch_root, ".pool", pool_id))


def test_a_create_claims_a_warm_container_and_the_pool_refills(h):
    ready = {c["Id"] for c in pool_containers(h)}
    record = create(h, environ={"MY_VAR": "1"})
    assert record["warm"] is True and record["status"] == "running"
    assert record["container_id"] in ready
    container = h.backend._container(record["container_id"])
    assert container.name == f"kernel.{AGENT}.k1"
    assert container.host_config["Memory"] == container.host_config["MemorySwap"] == 256 << 20
    assert container.host_config["CpusetCpus"] == record["resources"]["cpuset"]
    workspace = h.registry.workspace("k1")
    assert os.path.isdir(workspace.scratch_dir) and os.path.isfile(workspace.state_file)
    saved = json.load(open(workspace.state_file))
    assert saved["warm"] is True and saved["container_id"] == record["container_id"]
    assert json.load(open(workspace.environ_file)) == {"MY_VAR": "1", "OMP_NUM_THREADS": "1", "NPROC": "1"}
    link = h.registry.kernels["k1"].link
    assert link.sent[-1] == {"type": "claim", "environ": {"MY_VAR": "1", "OMP_NUM_THREADS": "1", "NPROC": "1"}}
    assert len(pool_containers(h)) == 2  # refilled
    state = h.registry.pool_state()
    assert (state["claims"], state["misses"]) == (1, 0)
    types = [e.type for e in h.journal.since(0) if e.kernel_id == "k1"]
    assert types == ["kernel-creating", "kernel-started"]


def test_what_the_pool_cannot_serve_is_created_cold(h, tmp_path):
    assert create(h, "gpu", resources={"cpu": 1, "mem": "256m", "cuda.device": 0})["warm"] is True  # no GPU asked
    assert create(h, "big-home", resources={"cpu": 1, "mem": "256m", "scratch": "1g"})["warm"] is False
    mounted = create(h, "mounted", mounts=[{"source": str(h.allowed / "set"), "target": "/data/set", "mode": "ro"}])
    assert mounted["warm"] is False
    h.registry.pool.set_targets({IMAGE: 0})
    assert create(h, "no-pool")["warm"] is False


def test_an_empty_pool_is_a_miss_and_the_create_goes_cold(h):
    h.runners.hold()  # refills wait for their runner
    assert create(h, "k1")["warm"] is True
    assert create(h, "k2")["warm"] is True
    cold = h.registry.create("k3", IMAGE, {"cpu": 1, "mem": "256m"})
    h.runners.release()
    assert result_of(cold)["warm"] is False
    assert h.registry.pool_state()["misses"] == 1


def test_a_warm_kernel_ends_like_a_cold_one_and_leaks_nothing(h):
    create(h, "k1")
    result_of(h.registry.destroy("k1"))
    assert kernel_containers(h) == []
    assert not os.path.exists(h.registry.workspace("k1").scratch_dir)
    assert not os.path.exists(h.registry.workspace("k1").state_dir)
    assert h.allocator.used()["cpu"] == 0
    # Its container dies by itself: reported like a cold kernel's.
    record = create(h, "k2")
    h.backend.die(record["container_id"], 137, oom=True)
    ended = [e for e in h.journal.since(0) if e.kernel_id == "k2" and e.type == "kernel-terminated"]
    assert ended and ended[0].data["reason"] == "oom-killed"
    assert kernel_containers(h) == []


def test_a_claim_that_fails_goes_cold_and_removes_that_pool_container(h):
    before = {c["Id"] for c in pool_containers(h)}
    h.backend.fail_next("update_container", errors.KernelCreationFailed("cgroup write refused"))
    record = create(h, "k1")
    assert record["warm"] is False and record["status"] == "running"
    assert record["container_id"] not in before
    assert len(pool_containers(h)) == 2 and len(before & {c["Id"] for c in pool_containers(h)}) == 1
    assert h.backend.container_status(record["container_id"]) == "running"


def test_a_dead_pool_container_is_replaced(h):
    [first, second] = pool_containers(h)
    h.backend.die(first["Id"], 1)
    ids = {c["Id"] for c in pool_containers(h)}
    assert first["Id"] not in ids and second["Id"] in ids and len(ids) == 2


def test_shrinking_and_removing_the_pool(h):
    h.registry.pool.set_targets({IMAGE: 1})
    assert len(pool_containers(h)) == 1
    h.registry.pool.set_targets(None)  # back to the command line's: none
    assert pool_containers(h) == []
    assert os.listdir(os.path.join(h.config.scratch_root, ".pool")) == []


def test_a_pool_image_not_here_is_a_problem_but_not_unhealthy(h):
    h.registry.pool.set_targets({"no/such:image": 1})
    assert "no/such:image is not a local kernel image" in h.registry.pool_state()["problem"]


def test_remove_image_of_a_pooled_image_is_in_use(h):
    with pytest.raises(errors.ImageInUse, match="warm pool"):
        result_of(h.registry.remove_image(IMAGE))


def test_the_next_run_takes_the_pool_back_and_the_warm_kernel_as_a_kernel(h):
    record = create(h, "k1")
    pool_ids = {c["Id"] for c in pool_containers(h)}
    registry = restarted(h)
    registry.pool.set_targets({IMAGE: 2})
    registry.startService()
    adopted = registry.kernels["k1"]
    assert adopted.warm and adopted.status == "running" and adopted.container_id == record["container_id"]
    assert registry.pool.container_ids() == pool_ids  # the same two, not new ones
    assert list(registry.kernels) == ["k1"]
    result_of(registry.destroy("k1"))
    assert kernel_containers(h) == []


def test_a_claim_cut_off_after_its_commit_is_finished_by_the_next_run(h):
    """Killed right after the kernel's state was written into the pool's state dir."""
    entry = h.registry.pool.take(h.registry.listed_image(IMAGE))
    commit_claim(entry, "k9")
    h.journal.append("kernel-creating", "k9", {"image": IMAGE})
    registry = restarted(h)
    registry.startService()
    kernel = registry.kernels["k9"]
    assert kernel.status == "running" and kernel.warm
    assert h.backend._container(entry.container_id).name == f"kernel.{AGENT}.k9"
    assert os.path.isdir(registry.workspace("k9").scratch_dir)
    assert os.path.isfile(os.path.join(h.config.state_dir, "kernels", kernel_key("k9"), "kernel.json"))
    assert not os.path.exists(entry.workspace.scratch_dir)
    assert registry.pool.container_ids().isdisjoint({entry.container_id})


def test_a_claim_cut_off_before_its_commit_leaves_a_pool_container(h):
    """Killed after the rename and the update, before the kernel's state was written."""
    entry = h.registry.pool.take(h.registry.listed_image(IMAGE))
    result_of(h.backend.rename_container(entry.container_id, f"kernel.{AGENT}.k8"))
    registry = restarted(h)
    registry.pool.set_targets({IMAGE: 2})
    registry.startService()
    assert "k8" not in registry.kernels
    assert entry.container_id in registry.pool.container_ids()  # back in the pool
    assert h.backend._container(entry.container_id).name.startswith("pool.")  # and named so again
    assert len(pool_containers(h)) + len([c for c in kernel_containers(h) if c["Id"] == entry.container_id]) == 2


def test_a_graceful_stop_keeps_the_pool_for_the_next_start(h):
    result_of(h.registry.stopService())
    assert len(pool_containers(h)) == 2


def test_pool_directories_whose_container_is_gone_are_removed_at_the_next_start(h):
    [first, _] = pool_containers(h)
    pool_id = first["Labels"]["ai.backend.pool-id"]
    result_of(h.backend.remove_container(first["Id"], force=True))
    registry = restarted(h)
    registry.startService()
    assert not os.path.exists(PoolWorkspace(h.config.scratch_root, h.config.state_dir, pool_id).state_dir)


def test_destroy_kernels_on_stop_removes_the_pool_too(h):
    import attrs

    h.registry.config = attrs.evolve(h.config, destroy_kernels_on_stop=True)
    result_of(h.registry.stopService())
    assert pool_containers(h) == []
    assert os.listdir(os.path.join(h.config.scratch_root, ".pool")) == []


def test_a_claim_cut_off_between_moving_its_state_and_its_home_is_finished(h):
    entry = h.registry.pool.take(h.registry.listed_image(IMAGE))
    commit_claim(entry, "k7")
    kernel_state = h.registry.workspace("k7").state_dir
    os.makedirs(os.path.dirname(kernel_state), exist_ok=True)
    os.rename(entry.workspace.state_dir, kernel_state)  # the state moved, the home not yet
    registry = restarted(h)
    registry.pool.set_targets({IMAGE: 2})
    registry.startService()
    assert registry.kernels["k7"].warm and registry.kernels["k7"].status == "running"
    assert os.path.isdir(registry.workspace("k7").scratch_dir)
    assert not os.path.exists(entry.workspace.scratch_dir)
    assert len(pool_containers(h)) == 2 and len(kernel_containers(h)) == 1


def test_a_pool_label_that_is_not_a_pool_id_never_names_a_directory(h, tmp_path):
    """A container labelled as ours with a pool id that climbs out of the pool's directory."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    climbing = os.path.relpath(victim, os.path.join(h.config.scratch_root, ".pool"))
    labels = {"ai.backend.agent-id": AGENT, "ai.backend.pool": "1", "ai.backend.pool-id": climbing}
    hostile = result_of(h.backend.create_container("pool.a1.hostile", {"Image": IMAGE, "Labels": labels}))
    registry = restarted(h)
    registry.pool.set_targets({IMAGE: 2})
    registry.startService()
    assert (victim / "precious").read_text() == "keep me"
    assert hostile not in registry.pool.container_ids()
    with pytest.raises(ValueError):
        PoolWorkspace(h.config.scratch_root, h.config.state_dir, "../x")
