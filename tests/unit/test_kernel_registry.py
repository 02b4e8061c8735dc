"""
The kernel lifecycle on the fake Docker backend and fake runners: create, destroy,
restart, death, timeouts, serialisation, and bad input that must leak nothing.
"""

import json
import math
import os
import stat

import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock

from bai_agent.config import AgentConfig
from bai_agent.docker.interface import DockerError, DockerUnavailable
from bai_agent.docker.service import DockerService
from bai_agent.kernels.allocator import Allocator
from bai_agent.kernels.journal import EventJournal
from bai_agent.kernels.registry import KernelRegistry
from bai_agent.node.capacity import Capacity
from bai_agent.protocol import errors
from bai_agent.testing.deferreds import has_fired, result_of
from bai_agent.testing.fake_docker import FakeDockerBackend
from bai_agent.testing.fake_runner import FakeRunners

IMAGE = "bai-kernel/python:3.11"
GIB = 1 << 30


class Harness:
    def __init__(self, tmp_path):
        self.clock = Clock()
        self.tmp = tmp_path
        self.allowed = tmp_path / "data"
        (self.allowed / "set").mkdir(parents=True)
        self.backend = FakeDockerBackend()
        self.backend.add_image(
            IMAGE,
            {
                "ai.backend.kernelspec": "1",
                "ai.backend.envs.corecount": "OMP_NUM_THREADS NPROC",
                "ai.backend.resource.min.mem": "64m",
            },
        )
        self.backend.add_image("plain/debian:12", {})
        self.docker = DockerService(self.clock, self.backend)
        self.docker.startService()
        self.config = AgentConfig(
            agent_id="a1",
            scratch_root=str(tmp_path / "scratch"),
            state_dir=str(tmp_path / "state"),
            allowed_mount_roots=(str(self.allowed),),
            kernel_network="none",
        )
        os.makedirs(self.config.scratch_root)
        os.makedirs(self.config.state_dir)
        self.allocator = Allocator(Capacity(cpu=4.0, mem=8 * GIB, cuda_device=0), [], cpu_cores=[0, 1, 2, 3])
        self.journal = EventJournal(str(tmp_path / "state" / "events.jsonl"), self.clock, fsync=False)
        self.runners = FakeRunners()
        self.disk = HeldDisk()
        self.tunables = {}
        self.registry = KernelRegistry(
            self.clock,
            self.config,
            self.docker,
            self.backend,
            self.allocator,
            self.journal,
            connect_runner=self.runners.connect,
            run_blocking=self.disk.run,
            runner_dir=str(tmp_path / "runner"),
            cluster_config=lambda: self.tunables,
        )
        self.registry.startService()

    def create(self, kernel_id="k1", image=IMAGE, resources=None, **kwargs):
        return result_of(self.registry.create(kernel_id, image, resources or {"cpu": 1, "mem": "256m"}, **kwargs))

    def events(self, type=None):
        return [event for event in self.journal.since(0) if type is None or event.type == type]

    def containers(self):
        return result_of(self.backend.list_containers(labels={"ai.backend.agent-id": "a1"}, all=True))

    def assert_nothing_leaked(self):
        assert self.containers() == []
        assert os.listdir(self.config.scratch_root) == []
        # {state_dir}/kernels appears with the first kernel; nothing may stay under it.
        kernels_dir = os.path.join(self.config.state_dir, "kernels")
        kernel_state = [
            os.path.join(top, name)
            for top, dirs, files in os.walk(self.config.state_dir)
            for name in dirs + files
            if os.path.join(top, name).startswith(kernels_dir + os.sep)
        ]
        assert kernel_state == []
        assert self.allocator.used() == {"cpu": 0, "mem": 0, "cuda.device": 0}
        assert self.registry.kernels == {}


class HeldDisk:
    """Disk work done at once, or held (``hold``) until ``release``: to catch operations mid-way."""

    def __init__(self):
        self.holding = False
        self.held = []

    def run(self, f, *args):
        if not self.holding:
            return maybeDeferred(f, *args)
        d = Deferred()
        self.held.append((d, f, args))
        return d

    def hold(self):
        self.holding = True

    def release(self):
        self.holding = False
        while self.held:
            d, f, args = self.held.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


# -- create ------------------------------------------------------------------------------


def test_create_starts_a_hardened_container_and_answers_a_running_record(h):
    record = h.create(environ={"GREETING": "hi"})
    assert record["status"] == "running"
    assert record["kernel_id"] == "k1" and record["image"] == IMAGE
    assert record["resources"]["cpu"] == 1 and record["resources"]["mem"] == 256 << 20
    (container,) = h.containers()
    inspect = result_of(h.backend.inspect_container(container["Id"]))
    assert inspect["Name"].lstrip("/") == "kernel.a1.k1"
    config, host = inspect["Config"], inspect["HostConfig"]
    assert config["Labels"]["ai.backend.kernel-id"] == "k1"
    assert config["Labels"]["ai.backend.agent-id"] == "a1"
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert "SYS_ADMIN" not in host["CapAdd"] and "NET_ADMIN" not in host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == 1024
    assert host["Memory"] == host["MemorySwap"] == 256 << 20
    assert host["CpusetCpus"] == record["resources"]["cpuset"]
    assert host["NetworkMode"] == "none"
    assert not any("docker.sock" in bind for bind in host["Binds"])
    assert f"{h.config.scratch_root}/k1:/home/work:rw" in host["Binds"]
    # The runner sets up user code as uid 1000.
    assert config["Cmd"][config["Cmd"].index("--uid") + 1] == "1000"
    # The runner (root) starts with nothing a manager chose; the kernel's environment
    # waits for user processes in the root-only run directory.
    assert config["Env"] == ["HOME=/home/work"]
    assert config["Cmd"][config["Cmd"].index("--environ-file") + 1] == "/run/bai/environ.json"
    workspace = h.registry.workspace("k1")
    with open(workspace.environ_file) as f:
        env = json.load(f)
    assert env == {"GREETING": "hi", "OMP_NUM_THREADS": "1", "NPROC": "1"}
    assert stat.S_IMODE(os.stat(workspace.environ_file).st_mode) == 0o600
    home = os.stat(os.path.join(h.config.scratch_root, "k1"))
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert [event.type for event in h.events()][-2:] == ["kernel-creating", "kernel-started"]
    assert h.allocator.used()["mem"] == 256 << 20


def test_fractional_cpu_gets_a_quota_and_no_cpuset(h):
    h.create(resources={"cpu": 0.5, "mem": "128m"})
    (container,) = h.containers()
    host = result_of(h.backend.inspect_container(container["Id"]))["HostConfig"]
    assert host["CpuQuota"] == 50000 and host["CpuPeriod"] == 100000
    assert not host.get("CpusetCpus")


def test_mounts_under_an_allowed_root_are_bound(h):
    h.create(mounts=[{"source": str(h.allowed / "set"), "target": "/data/set", "mode": "ro"}])
    (container,) = h.containers()
    binds = result_of(h.backend.inspect_container(container["Id"]))["HostConfig"]["Binds"]
    # Docker gets the checked directory pinned under the kernel's state dir, not the path.
    pin = os.path.join(h.registry.workspace("k1").state_dir, "mounts", "0")
    assert f"{pin}:/data/set:ro" in binds
    assert not os.path.exists(pin)  # unpinned once the container started


def test_a_mount_source_swapped_for_a_symlink_is_refused_at_the_restart(h, tmp_path):
    outside = tmp_path / "host-secrets"
    outside.mkdir()
    h.create(mounts=[{"source": str(h.allowed / "set"), "target": "/data/set", "mode": "rw"}])
    seen = []
    create_container = h.backend.create_container

    def spying(name, body):
        seen.extend(sorted(os.listdir(body["HostConfig"]["Binds"][-1].split(":")[0])))
        return create_container(name, body)

    h.backend.create_container = spying
    os.rmdir(h.allowed / "set")
    os.symlink(outside, h.allowed / "set")
    (outside / "shadow").write_text("root only")
    with pytest.raises(errors.KernelCreationFailed, match="symlink"):
        result_of(h.registry.restart("k1"))
    assert seen == []  # never handed to Docker
    h.assert_nothing_leaked()


def test_idle_and_exec_timeouts_default_from_etcd_config(h):
    h.tunables.update(idle_timeout=600, exec_timeout=30)
    record = h.create()
    assert (record["idle_timeout"], record["exec_timeout"]) == (600, 30)
    assert h.create("k2", idle_timeout=0)["idle_timeout"] == 0


# -- bad input: a declared error and nothing leaked ----------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"image": "no/such:image", "image_pull": "never"}, errors.ImageNotFound),
        ({"image": "plain/debian:12"}, errors.ImageNotFound),
        ({"image": "bad//reference"}, errors.InvalidRequest),
        ({"image_pull": "sometimes"}, errors.InvalidRequest),
        ({"registry_auth": {"username": "u"}}, errors.InvalidRequest),
        ({"registry_auth": {"username": "u", "password": ""}}, errors.InvalidRequest),
        ({"image": ""}, errors.InvalidRequest),
        ({"resources": {"cpu": -1}}, errors.InvalidRequest),
        ({"resources": {"cpu": math.nan}}, errors.InvalidRequest),
        ({"resources": {"mem": "12q"}}, errors.InvalidRequest),
        ({"resources": {"cpu": 64}}, errors.InsufficientResources),
        ({"resources": {"mem": "1t"}}, errors.InsufficientResources),
        ({"resources": {"cuda.device": 1}}, errors.InsufficientResources),
        ({"resources": {"mem": "32m"}}, errors.InvalidRequest),  # below the image's min.mem
        ({"resources": "lots"}, errors.InvalidRequest),
        ({"kernel_id": "../evil"}, errors.InvalidRequest),
        ({"kernel_id": ""}, errors.InvalidRequest),
        ({"kernel_id": "x" * 65}, errors.InvalidRequest),
        ({"environ": {"A": 1}}, errors.InvalidRequest),
        ({"environ": {"A": None}}, errors.InvalidRequest),
        ({"environ": {"BAD NAME": "x"}}, errors.InvalidRequest),
        ({"environ": ["A=1"]}, errors.InvalidRequest),
        ({"mounts": [{"source": "/", "target": "/host", "mode": "ro"}]}, errors.InvalidRequest),
        ({"mounts": [{"source": "/etc", "target": "/data/etc", "mode": "ro"}]}, errors.InvalidRequest),
        ({"mounts": "PLACEHOLDER_DOTDOT"}, errors.InvalidRequest),
        ({"mounts": [{"source": "/tmp", "target": "/data/tmp", "mode": "rw"}]}, errors.InvalidRequest),
        ({"mounts": "PLACEHOLDER_TARGET_ETC"}, errors.InvalidRequest),
        ({"mounts": "PLACEHOLDER_BAD_MODE"}, errors.InvalidRequest),
        ({"mounts": {"source": "/"}}, errors.InvalidRequest),
        ({"idle_timeout": -1}, errors.InvalidRequest),
    ],
)
def test_bad_create_is_a_declared_error_and_leaks_nothing(h, kwargs, error):
    kwargs = dict(kwargs)
    mounts = kwargs.get("mounts")
    if mounts == "PLACEHOLDER_DOTDOT":
        kwargs["mounts"] = [{"source": str(h.allowed / "set" / ".." / ".." / ".."), "target": "/data/up", "mode": "ro"}]
    elif mounts == "PLACEHOLDER_TARGET_ETC":
        kwargs["mounts"] = [{"source": str(h.allowed / "set"), "target": "/etc", "mode": "ro"}]
    elif mounts == "PLACEHOLDER_BAD_MODE":
        kwargs["mounts"] = [{"source": str(h.allowed / "set"), "target": "/data/x", "mode": "rwx"}]
    with pytest.raises(error):
        h.create(**kwargs)
    h.assert_nothing_leaked()
    assert h.events("kernel-creating") == []


def test_a_symlink_out_of_an_allowed_root_is_refused(h):
    os.symlink("/etc", h.allowed / "link")
    with pytest.raises(errors.InvalidRequest, match="allowed mount root"):
        h.create(mounts=[{"source": str(h.allowed / "link"), "target": "/data/l", "mode": "ro"}])
    h.assert_nothing_leaked()


def test_duplicate_kernel_id_is_kernel_exists(h):
    h.create()
    with pytest.raises(errors.KernelExists):
        h.create()
    assert len(h.containers()) == 1


def test_destroy_of_an_unknown_kernel_is_kernel_not_found(h):
    with pytest.raises(errors.KernelNotFound):
        result_of(maybeDeferred(h.registry.destroy, "nope"))


@pytest.mark.parametrize("method", ["create_container", "start_container"])
def test_docker_failure_during_create_rolls_everything_back(h, method):
    h.backend.fail_next(method, DockerError("boom", status=500), applied=True)
    with pytest.raises(errors.KernelCreationFailed, match="boom"):
        h.create()
    h.assert_nothing_leaked()
    (terminated,) = h.events("kernel-terminated")
    assert terminated.data["reason"] == "creation-failed"


def test_docker_unreachable_during_create_is_backend_unavailable_and_rolls_back(h):
    h.backend.fail_next("create_container", DockerUnavailable("gone"))
    with pytest.raises(errors.BackendUnavailable):
        h.create()
    h.assert_nothing_leaked()


def test_runner_that_never_answers_fails_the_create_and_rolls_back(h):
    h.runners.fail_next()
    with pytest.raises(errors.KernelCreationFailed, match="runner"):
        h.create()
    h.assert_nothing_leaked()


# -- destroy, restart, reset -------------------------------------------------------------


def test_destroy_removes_container_scratch_dir_and_grant(h):
    h.create()
    answer = result_of(h.registry.destroy("k1"))
    assert answer["kernel_id"] == "k1"
    assert "stats" in answer
    h.assert_nothing_leaked()
    (terminated,) = h.events("kernel-terminated")
    assert terminated.kernel_id == "k1"
    assert terminated.data["reason"] == "user-requested"
    assert h.runners.links[0].closed_because


def test_two_destroys_share_one_answer_and_one_event(h):
    h.create()
    h.disk.hold()  # the first destroy stops at removing the directories
    first = h.registry.destroy("k1")
    second = h.registry.destroy("k1")
    assert not has_fired(first) and not has_fired(second)
    h.disk.release()
    assert result_of(first) == result_of(second)
    assert len(h.events("kernel-terminated")) == 1
    with pytest.raises(errors.KernelNotFound):
        result_of(maybeDeferred(h.registry.destroy, "k1"))


def test_destroy_during_create_waits_then_destroys(h):
    h.runners.hold()
    creating = h.registry.create("k1", IMAGE, {"cpu": 1})
    destroying = h.registry.destroy("k1")
    with pytest.raises(errors.KernelExists):
        h.create("k1")
    assert not has_fired(creating) and not has_fired(destroying)
    h.runners.release()
    assert result_of(creating)["status"] == "running"
    assert result_of(destroying)["kernel_id"] == "k1"
    h.assert_nothing_leaked()


def test_restart_keeps_the_home_and_grant_and_replaces_the_container(h):
    record = h.create()
    home = os.path.join(h.config.scratch_root, "k1", "notes.txt")
    with open(home, "w") as f:
        f.write("kept")
    restarted = result_of(h.registry.restart("k1"))
    assert restarted["status"] == "running"
    assert restarted["container_id"] != record["container_id"]
    assert restarted["resources"] == record["resources"]
    assert open(home).read() == "kept"
    assert len(h.containers()) == 1
    types = [event.type for event in h.events()]
    assert types[-2:] == ["kernel-terminated", "kernel-restarted"]
    assert h.events("kernel-terminated")[0].data["reason"] == "restarting"


def test_restart_during_destroy_is_kernel_not_found(h):
    h.create()
    h.disk.hold()
    d = h.registry.destroy("k1")
    assert not has_fired(d)
    with pytest.raises(errors.KernelNotFound):
        result_of(maybeDeferred(h.registry.restart, "k1"))
    h.disk.release()
    result_of(d)
    h.assert_nothing_leaked()


def test_reset_destroys_every_kernel(h):
    for kernel_id in ("k1", "k2", "k3"):
        h.create(kernel_id)
    assert result_of(h.registry.reset()) == 3
    h.assert_nothing_leaked()
    assert {event.data["reason"] for event in h.events("kernel-terminated")} == {"agent-reset"}


# -- death -------------------------------------------------------------------------------


def test_a_dead_container_is_reported_once_and_cleaned(h):
    record = h.create()
    h.backend.die(record["container_id"], 3)
    h.assert_nothing_leaked()
    (terminated,) = h.events("kernel-terminated")
    assert terminated.data["reason"] == "self-terminated"
    assert terminated.data["exit_code"] == 3


def test_an_oom_kill_is_reported_as_oom_killed(h):
    record = h.create()
    h.backend.die(record["container_id"], 137, oom=True)
    (terminated,) = h.events("kernel-terminated")
    assert terminated.data["reason"] == "oom-killed"
    assert terminated.data["exit_code"] == 137
    h.assert_nothing_leaked()


@pytest.mark.parametrize("oom_event", ["after", "missing"])
def test_an_oom_kill_docker_reports_late_or_not_at_all_is_still_oom_killed(h, oom_event):
    record = h.create()
    h.backend.die(record["container_id"], 137, oom=True, oom_event=oom_event)
    (terminated,) = h.events("kernel-terminated")
    assert terminated.data["reason"] == "oom-killed"
    h.assert_nothing_leaked()


def test_a_container_killed_through_docker_is_self_terminated_not_oom(h):
    record = h.create()
    result_of(h.backend.kill_container(record["container_id"]))  # like `docker kill`
    (terminated,) = h.events("kernel-terminated")
    assert terminated.data == {"reason": "self-terminated", "exit_code": 137, "stats": {}}
    h.assert_nothing_leaked()


def test_a_missed_die_event_is_found_by_the_relist(h):
    record = h.create()
    h.backend.set_available(False)  # the events stream breaks: the die is not seen
    h.backend.set_available(True)
    result_of(h.backend.remove_container(record["container_id"], force=True))
    assert h.registry.kernels  # not noticed yet
    h.docker.healthy = True
    h.clock.advance(10)
    h.assert_nothing_leaked()
    assert h.events("kernel-terminated")[0].data["reason"] == "self-terminated"


def test_kernels_that_died_while_docker_was_away_are_reported_when_it_answers_again(h):
    record = h.create()
    h.backend.set_available(False)  # the daemon goes away; its events stream breaks
    assert not h.docker.healthy
    h.backend.set_available(True)  # back, but the agent has not reconnected yet
    result_of(h.backend.remove_container(record["container_id"], force=True))  # unseen
    assert h.registry.kernels
    h.clock.advance(2)  # the reconnect, long before the next 10 s re-list
    h.assert_nothing_leaked()
    [terminated] = h.events("kernel-terminated")
    assert terminated.data["reason"] == "self-terminated"


def test_a_container_whose_removal_failed_is_removed_by_the_relist(h):
    record = h.create()
    h.backend.fail_next("remove_container", DockerError("device busy"))
    result_of(h.registry.destroy("k1"))
    assert [c["Id"] for c in h.containers()] == [record["container_id"]]  # left behind
    assert h.allocator.used()["cpu"] == 0  # but nothing else held for it
    h.clock.advance(10)
    h.assert_nothing_leaked()
    assert len(h.events("kernel-terminated")) == 1


def test_a_lost_runner_with_a_dead_container_ends_the_kernel(h):
    record = h.create()
    h.backend.set_available(False)
    h.backend.set_available(True)
    result_of(h.backend.kill_container(record["container_id"]))
    h.runners.links[0].close("connection lost")
    h.assert_nothing_leaked()


# -- timeouts and records ------------------------------------------------------------------


def test_idle_kernel_is_destroyed_after_its_idle_timeout(h):
    h.create(idle_timeout=30)
    h.clock.advance(20)
    h.registry.touch("k1")
    h.clock.advance(20)
    assert "k1" in h.registry.kernels
    h.clock.advance(12)
    h.assert_nothing_leaked()
    assert h.events("kernel-terminated")[0].data["reason"] == "idle-timeout"


def test_list_and_saved_state(h):
    h.create("k1")
    h.create("k2", resources={"cpu": 2, "mem": "1g"})
    assert [record["kernel_id"] for record in h.registry.records()] == ["k1", "k2"]
    assert h.allocator.used()["cpu"] == 3
    saved = [
        json.load(open(os.path.join(root, "kernel.json")))
        for root, _, files in os.walk(os.path.join(h.config.state_dir, "kernels"))
        if "kernel.json" in files
    ]
    assert sorted(state["kernel_id"] for state in saved) == ["k1", "k2"]
    run_dirs = [
        os.path.join(root, d)
        for root, dirs, _ in os.walk(os.path.join(h.config.state_dir, "kernels"))
        for d in dirs
        if d == "run"
    ]
    assert len(run_dirs) == 2, run_dirs  # one per kernel: the check below is not vacuous
    assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o700 for path in run_dirs)


def test_stop_journals_agent_stopping(h):
    h.create()
    result_of(h.registry.stopService())
    assert h.events()[-1].type == "agent-stopping"


# -- taking over after an agent restart -----------------------------------------------------


def restarted(h):
    """A new registry over the same Docker, directories and journal file: the agent restarted."""
    result_of(h.registry.stopService())
    h.allocator = Allocator(Capacity(cpu=4.0, mem=8 * GIB, cuda_device=0), [], cpu_cores=[0, 1, 2, 3])
    h.journal = EventJournal(
        h.journal.path if hasattr(h.journal, "path") else str(h.tmp / "state" / "events.jsonl"), h.clock, fsync=False
    )
    h.registry = KernelRegistry(
        h.clock,
        h.config,
        h.docker,
        h.backend,
        h.allocator,
        h.journal,
        connect_runner=h.runners.connect,
        run_blocking=h.disk.run,
        runner_dir=str(h.tmp / "runner"),
        cluster_config=lambda: h.tunables,
    )
    return h.registry


def test_restart_adopts_running_kernels_and_reports_what_ended_meanwhile(h):
    kept = h.create("kept", resources={"cpu": 2, "mem": "1g"}, idle_timeout=100)
    died = h.create("died")
    last_seq = h.journal.last_seq
    registry = restarted(h)
    h.backend.die(died["container_id"], 7)  # while no agent watched
    # Another agent's kernel and a container without kernel labels: never touched.
    foreign = result_of(
        h.backend.create_container(
            "kernel.a2.x", {"Image": IMAGE, "Labels": {"ai.backend.agent-id": "a2", "ai.backend.kernel-id": "x"}}
        )
    )
    unlabelled = result_of(h.backend.create_container("bystander", {"Image": IMAGE}))
    registry.startService()

    assert registry.recovered
    assert list(registry.kernels) == ["kept"]
    adopted = registry.kernels["kept"]
    assert adopted.status == "running" and adopted.container_id == kept["container_id"]
    assert adopted.grant.to_json() == kept["resources"]
    assert adopted.idle_timeout == 100
    assert h.allocator.used()["cpu"] == 2 and h.allocator.used()["mem"] == 1 * GIB
    assert adopted.session is not None  # the runner was reconnected
    ended = [e for e in h.journal.since(last_seq) if e.type == "kernel-terminated"]
    assert [(e.kernel_id, e.data["reason"], e.data["exit_code"]) for e in ended] == [("died", "self-terminated", 7)]
    assert h.backend.container_status(foreign) == "created"
    assert h.backend.container_status(unlabelled) == "created"
    assert sorted(os.listdir(h.config.scratch_root)) == ["kept"]
    assert h.journal.since(last_seq)[0].seq == last_seq + 1  # seq goes on


@pytest.mark.parametrize(
    "last_event, data, announced",
    [
        ("kernel-creating", {"image": IMAGE}, "kernel-started"),  # killed before kernel-started
        ("kernel-terminated", {"reason": "restarting", "exit_code": 0, "stats": {}}, "kernel-restarted"),
        ("kernel-started", {}, None),  # the usual case: nothing more to say
    ],
)
def test_adopting_a_kernel_whose_start_was_never_announced_announces_it(h, last_event, data, announced):
    h.create("k1")
    registry = restarted(h)
    h.journal.open()
    h.journal.append(last_event, "k1", data)  # what the killed run had journaled last
    h.journal.close()
    last_seq = h.journal.last_seq
    registry.startService()
    assert list(registry.kernels) == ["k1"]
    after = [(e.type, e.kernel_id) for e in h.journal.since(last_seq) if e.kernel_id]
    assert after == ([(announced, "k1")] if announced else [])


def test_restart_removes_what_an_interrupted_create_left(h):
    registry = restarted(h)
    # A container of ours with no saved state (killed between create and save), and a
    # home with neither state nor container (killed after making the directories).
    orphan = result_of(
        h.backend.create_container(
            "kernel.a1.half", {"Image": IMAGE, "Labels": {"ai.backend.agent-id": "a1", "ai.backend.kernel-id": "half"}}
        )
    )
    os.mkdir(os.path.join(h.config.scratch_root, "homeless"))
    registry.startService()
    assert h.backend.container_status(orphan) is None
    assert os.listdir(h.config.scratch_root) == []
    cleaned = {e.kernel_id: e.data["reason"] for e in h.journal.since(0) if e.type == "kernel-terminated"}
    assert cleaned == {"half": "orphan-cleanup", "homeless": "orphan-cleanup"}
    h.assert_nothing_leaked()


def test_a_kernel_whose_runner_does_not_answer_after_restart_is_ended(h):
    h.create("mute")
    registry = restarted(h)
    h.runners.fail_next()
    registry.startService()
    assert registry.kernels == {}
    (ended,) = [e for e in h.journal.since(0) if e.type == "kernel-terminated"]
    assert ended.data["reason"] == "self-terminated"
    h.assert_nothing_leaked()


def test_creates_wait_for_the_take_over(h):
    registry = restarted(h)
    h.docker.healthy = False
    registry.startService()
    assert not registry.recovered
    with pytest.raises(errors.BackendUnavailable, match="taking over"):
        h.create("early")
    h.docker.healthy = True
    h.clock.advance(10)  # the re-list notices Docker is back
    assert registry.recovered
    assert h.create("later")["status"] == "running"


def test_before_the_take_over_knows_its_kernels_nothing_is_said_to_be_gone(h):
    h.create("k1")
    registry = restarted(h)
    h.docker.healthy = False  # the take-over cannot even list the containers yet
    registry.startService()
    for call in (
        registry.list_records,
        lambda: registry.get("k1"),
        lambda: registry.session("k1"),
        lambda: registry.destroy("k1"),
        lambda: registry.upload("k1", "f", b"x", False),
    ):
        with pytest.raises(errors.BackendUnavailable, match="taking over"):
            call()
    with pytest.raises(errors.InvalidRequest):
        registry.get("bad id")


def test_while_runners_are_reconnected_every_kernel_is_listed_and_commands_wait_or_say_unavailable(h):
    h.create("alive")
    h.create("other")
    registry = restarted(h)
    h.runners.hold()  # the runners of the last run answer slowly
    registry.startService()
    # The first part is done: every kernel is known, though no runner answered yet.
    assert registry.recovered and not registry.taken_over
    listed = {record["kernel_id"]: record["status"] for record in registry.list_records()}
    assert listed == {"alive": "running", "other": "running"}
    with pytest.raises(errors.BackendUnavailable, match="reconnecting"):
        registry.session("alive")
    destroyed = registry.destroy("alive")  # waits for the reconnection, then destroys
    assert not has_fired(destroyed)
    assert len(h.runners.held) == 2
    h.runners.release()
    assert result_of(destroyed)["kernel_id"] == "alive"
    assert registry.taken_over
    assert registry.session("other") is not None
    ended = {e.kernel_id: e.data["reason"] for e in h.journal.since(0) if e.type == "kernel-terminated"}
    assert ended == {"alive": "user-requested"}


def test_a_new_kernel_cannot_take_the_id_of_one_the_take_over_is_still_ending(h):
    registry = restarted(h)
    orphan = result_of(
        h.backend.create_container(
            "kernel.a1.half", {"Image": IMAGE, "Labels": {"ai.backend.agent-id": "a1", "ai.backend.kernel-id": "half"}}
        )
    )
    h.disk.hold()
    registry.startService()
    while not registry.recovered:  # the reads of the first part, one by one
        d, f, args = h.disk.held.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)
    assert registry.kernels["half"].status == "terminating"
    with pytest.raises(errors.KernelExists):
        registry.create("half", IMAGE, {"cpu": 1, "mem": "256m"})
    h.disk.release()
    assert h.backend.container_status(orphan) is None
    assert "half" not in registry.kernels
    assert h.create("half")["status"] == "running"


def test_a_broken_link_to_a_live_container_is_reconnected(h):
    h.create()
    first = h.runners.links[0]
    first.close("keepalive timeout")
    kernel = h.registry.kernels["k1"]
    assert kernel.status == "running"
    assert kernel.link is h.runners.links[1] and kernel.session is not None
    assert h.events("kernel-terminated") == []


def test_a_live_container_whose_runner_stays_silent_is_ended(h):
    h.create()
    h.runners.fail_next()
    h.runners.links[0].close("keepalive timeout")
    h.assert_nothing_leaked()
    assert h.events("kernel-terminated")[0].data["reason"] == "self-terminated"


def test_a_reconnect_under_way_is_cancelled_when_the_kernel_ends(h):
    h.create()
    h.runners.hold()
    h.runners.links[0].close("keepalive timeout")  # a reconnect starts and waits
    assert len(h.runners.held) == 1
    result_of(h.registry.destroy("k1"))
    pending, _ = h.runners.held[0]
    assert pending.called  # cancelled: it can never take a later kernel's runner
    h.assert_nothing_leaked()


# -- statistics ------------------------------------------------------------------------


class StubStats:
    """The collector's side the registry uses: latest, sample_kernel, forget."""

    def __init__(self):
        self.samples = {}
        self.fresh = {}
        self.forgotten = []
        self.sampled = []

    def latest(self, kernel_id):
        return self.samples.get(kernel_id)

    def sample_kernel(self, target):
        self.sampled.append(target)
        sample = self.fresh.get(target.kernel_id)
        if sample is not None:
            self.samples[target.kernel_id] = sample
        return succeed(sample or self.samples.get(target.kernel_id))

    def forget(self, kernel_id):
        self.forgotten.append(kernel_id)
        self.samples.pop(kernel_id, None)


def test_stats_targets_are_the_running_kernels_with_their_homes(h):
    record = h.create()
    [target] = h.registry.stats_targets()
    assert target.kernel_id == "k1" and target.container_id == record["container_id"]
    assert target.scratch_dir == os.path.join(h.config.scratch_root, "k1")


def test_destroy_answers_and_reports_the_sample_taken_before_the_stop(h):
    h.registry.stats = stats = StubStats()
    h.create()
    stats.samples["k1"] = {"cpu_used_ms": 10}
    stats.fresh["k1"] = {"cpu_used_ms": 1500, "mem_bytes": 1 << 20}
    answer = result_of(h.registry.destroy("k1"))
    assert answer["stats"] == {"cpu_used_ms": 1500, "mem_bytes": 1 << 20}
    assert h.events("kernel-terminated")[0].data["stats"] == answer["stats"]
    assert stats.forgotten == ["k1"]


def test_a_death_reports_the_latest_periodic_sample(h):
    h.registry.stats = stats = StubStats()
    record = h.create()
    stats.samples["k1"] = {"cpu_used_ms": 42}
    h.backend.kill_container(record["container_id"])
    [terminated] = h.events("kernel-terminated")
    assert terminated.data["stats"] == {"cpu_used_ms": 42}
    assert stats.forgotten == ["k1"]


def test_kernel_stats_gives_the_latest_or_a_fresh_sample(h):
    h.registry.stats = stats = StubStats()
    with pytest.raises(errors.KernelNotFound):
        result_of(h.registry.kernel_stats("nope"))
    h.create()
    stats.fresh["k1"] = {"cpu_used_ms": 7}
    assert result_of(h.registry.kernel_stats("k1")) == {"cpu_used_ms": 7}  # none yet: sampled now
    stats.samples["k1"] = {"cpu_used_ms": 9}
    assert result_of(h.registry.kernel_stats("k1")) == {"cpu_used_ms": 9}
    assert len(stats.sampled) == 1


def test_destroy_all_on_stop_reports_agent_stopping_and_leaks_nothing(h):
    h.create("k1")
    h.create("k2")
    assert result_of(h.registry.destroy_all("agent-stopping")) == 2
    h.assert_nothing_leaked()
    assert sorted((e.kernel_id, e.data["reason"]) for e in h.events("kernel-terminated")) == [
        ("k1", "agent-stopping"),
        ("k2", "agent-stopping"),
    ]


def test_managers_cannot_claim_the_agents_own_reasons(h):
    h.create()
    with pytest.raises(errors.InvalidRequest):
        h.registry.destroy("k1", "agent-stopping")


def test_an_adopted_kernel_has_its_images_labels_even_if_docker_had_not_listed_images_yet(h):
    h.create("k1")
    # The take-over starts when Docker first answers, before its images are listed.
    h.docker = DockerService(h.clock, h.backend)
    h.docker.healthy = True
    registry = restarted(h)
    registry.startService()
    adopted = registry.kernels["k1"]
    assert adopted.status == "running"
    assert adopted.image.labels.get("ai.backend.envs.corecount") == "OMP_NUM_THREADS NPROC"


def test_a_kernel_announced_but_left_nowhere_is_reported_ended_after_a_restart(h):
    # The last run was killed while the kernel's image was pulled: kernel-creating, then
    # nothing, and no container, state or home.
    registry = restarted(h)
    h.journal.open()
    h.journal.append("kernel-creating", "ghost", {"image": "reg.example/x:1"})
    h.journal.close()
    last_seq = h.journal.last_seq
    registry.startService()
    ended = [(e.type, e.kernel_id, e.data.get("reason")) for e in h.journal.since(last_seq) if e.kernel_id]
    assert ended == [("kernel-terminated", "ghost", "orphan-cleanup")]
    assert "ghost" not in registry.kernels
