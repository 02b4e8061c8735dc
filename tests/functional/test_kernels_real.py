"""
Kernels on the real Docker daemon, through a real agent process and the AMP client:
create, destroy, restart, death, OOM, events across reconnects and agent restarts; each
test runs twice: with kernels created cold, and claimed from a warm pool (section 9), which
a manager must not be able to tell apart.
"""

import json

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import wait_until
from tests.functional.agent_process import docker, running_agent
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


def our_containers(agent):
    """The kernels' containers (the warm pool's are not kernels)."""
    listed = docker(
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        f"label=ai.backend.agent-id={agent.agent_id}",
        "--format",
        "{{.ID}} {{.Names}}",
    ).stdout.split("\n")
    return [line.split()[0][:12] for line in listed if line.strip() and not line.split()[1].startswith("pool.")]


@pytest.fixture(params=["cold", "warm"])
def agent(request, tmp_path, etcd_server, docker_host):
    extra = ["--warm-pool", f"{IMAGE}=3"] if request.param == "warm" else []
    with running_agent(tmp_path, etcd_server.addr, "agent-k", extra) as process:
        process.warm = request.param == "warm"
        if process.warm:
            process.wait_for(lambda: pool_ready(process) >= 2, 60, "the warm pool")
        yield process


def pool_ready(agent):
    status, body = agent.http("/status.json")
    if status != 200:
        return 0
    images = json.loads(body)["pool"]["images"]
    return images.get(IMAGE, {}).get("ready", 0)


def scratch(agent, tmp_path, kernel_id=""):
    return agent.scratch_root / kernel_id


def homes(agent):
    """The kernel homes under the scratch root; their images (hostfile) only while they live."""
    root = agent.scratch_root
    names = sorted(p.name for p in root.iterdir() if p.name not in (".volumes", ".pool"))
    volumes, pool = root / ".volumes", root / ".pool"
    pool_homes = len(list(pool.iterdir())) if pool.exists() else 0
    assert not volumes.exists() or len(list(volumes.iterdir())) <= len(names) + pool_homes, sorted(volumes.iterdir())
    return names


def secret(agent, tmp_path):
    return agent.secret_path.read_text().strip()


def connect(reactor, agent, tmp_path, on_event=None):
    return AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret(agent, tmp_path), on_event=on_event)


@pytest_twisted.inlineCallbacks
def test_create_list_destroy_on_real_docker(agent, tmp_path, reactor, etcd_server):
    client = yield connect(reactor, agent, tmp_path)
    try:
        record = yield client.create_kernel("k1", IMAGE, {"cpu": 1, "mem": "128m"}, environ={"GREETING": "hi"})
        assert record["status"] == "running"
        (container,) = our_containers(agent)
        # The limits are in force when the create answers (a claim writes them into the
        # cgroup; Docker's own record of them follows within milliseconds).
        limit = docker("exec", container, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes", check=False)
        if limit.returncode == 0:
            assert int(limit.stdout) == 128 << 20
        yield wait_until(
            reactor,
            lambda: json.loads(docker("inspect", container).stdout)[0]["HostConfig"]["Memory"] == 128 << 20,
            5,
            "Docker's record of the limits",
        )
        inspect = json.loads(docker("inspect", container).stdout)[0]
        host = inspect["HostConfig"]
        assert inspect["Name"] == "/kernel.agent-k.k1"
        assert record["warm"] is agent.warm
        if agent.warm:  # labels cannot change: it was made for the pool
            assert inspect["Config"]["Labels"]["ai.backend.pool"] == "1"
        else:
            assert inspect["Config"]["Labels"]["ai.backend.kernel-id"] == "k1"
        assert host["Privileged"] is False and host["CapDrop"] == ["ALL"]
        assert host["Memory"] == host["MemorySwap"] == 128 << 20
        assert host["NetworkMode"] == "none"
        # The kernel's environment is for user processes, never the container's (the runner's).
        assert not any(item.startswith("GREETING=") for item in inspect["Config"]["Env"])
        top = docker("top", container).stdout
        assert "query.py" in top or "main.py" in top
        home = scratch(agent, tmp_path, "k1")
        assert home.is_dir() and home.stat().st_uid == 1000
        kernels = yield client.list_kernels()
        assert [kernel["kernel_id"] for kernel in kernels] == ["k1"]
        info = yield client.get_agent_info()
        assert info["kernels"] == 1 and info["resources"]["mem"]["used"] == 128 << 20

        with pytest.raises(errors.KernelExists):
            yield client.create_kernel("k1", IMAGE, {"cpu": 1, "mem": "128m"})

        answer = yield client.destroy_kernel("k1")
        assert answer["kernel_id"] == "k1"
        assert our_containers(agent) == []
        assert not home.exists()
        assert (yield client.list_kernels()) == []
        with pytest.raises(errors.KernelNotFound):
            yield client.destroy_kernel("k1")
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_code_sees_the_kernels_environment_cores_and_home(agent, tmp_path, reactor):
    client = yield connect(reactor, agent, tmp_path)
    try:
        record = yield client.create_kernel("env", IMAGE, {"cpu": 1, "mem": "128m"}, environ={"GREETING": "hi"})
        assert record["warm"] is agent.warm
        answer = yield client.execute(
            "env",
            "query",
            "import os\n"
            "print(os.environ['GREETING'], os.environ['OMP_NUM_THREADS'], len(os.sched_getaffinity(0)))\n"
            "n = open('written.txt', 'w').write(os.getcwd())\n",
        )
        assert answer["console"] == [["stdout", "hi 1 1\n"]], answer
        console, _ = yield run_to_end(client, "env", "batch", options={"exec": "echo $GREETING; nproc"})
        assert text(console, "stdout") == "hi\n1\n", console
        downloaded = yield client.download_file("env", "written.txt")
        assert downloaded["data"] == b"/home/work"
        assert (scratch(agent, tmp_path, "env") / "written.txt").read_text() == "/home/work"
        yield client.destroy_kernel("env")
        assert our_containers(agent) == [] and homes(agent) == []
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_bad_requests_leak_nothing_on_real_docker(agent, tmp_path, reactor):
    client = yield connect(reactor, agent, tmp_path)
    try:
        for kwargs, error in [
            ({"image": "no/such:1", "image_pull": "never"}, errors.ImageNotFound),
            ({"image": "127.0.0.1:1/no/such:1"}, errors.ImagePullFailed),  # no registry there
            ({"resources": {"cpu": -1}}, errors.InvalidRequest),
            ({"resources": {"mem": "12q"}}, errors.InvalidRequest),
            ({"resources": {"cpu": 1000}}, errors.InsufficientResources),
            ({"kernel_id": "../x"}, errors.InvalidRequest),
            ({"environ": {"A": 1}}, errors.InvalidRequest),
            ({"mounts": [{"source": "/etc", "target": "/data", "mode": "ro"}]}, errors.InvalidRequest),
        ]:
            arguments = {"kernel_id": "bad", "image": IMAGE, "resources": {"cpu": 1, "mem": "128m"}}
            arguments.update(kwargs)
            with pytest.raises(error):
                yield client.create_kernel(**arguments)
        assert our_containers(agent) == []
        assert homes(agent) == []
        info = yield client.get_agent_info()
        assert info["resources"]["cpu"]["used"] == 0
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_restart_keeps_the_home(agent, tmp_path, reactor):
    client = yield connect(reactor, agent, tmp_path)
    try:
        first = yield client.create_kernel("k2", IMAGE, {"cpu": 0.5, "mem": "128m"})
        (scratch(agent, tmp_path, "k2") / "kept.txt").write_text("kept")
        second = yield client.restart_kernel("k2")
        assert second["status"] == "running"
        assert second["container_id"] != first["container_id"]
        assert (scratch(agent, tmp_path, "k2") / "kept.txt").read_text() == "kept"
        assert our_containers(agent) == [second["container_id"][:12]]
        yield client.destroy_kernel("k2")
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_deaths_are_reported_with_the_right_reason_and_cleaned(agent, tmp_path, reactor):
    events = []
    client = yield connect(reactor, agent, tmp_path, on_event=events.append)
    try:
        yield client.subscribe(0)
        oom = yield client.create_kernel("oom", IMAGE, {"cpu": 0.5, "mem": "64m"})
        killed = yield client.create_kernel("killed", IMAGE, {"cpu": 0.5, "mem": "64m"})
        # Make the runner the OOM killer's choice, then exceed the limit.
        docker(
            "exec",
            oom["container_id"],
            "sh",
            "-c",
            'echo 1000 > /proc/1/oom_score_adj; python3 -c "b = bytearray(300 << 20)"',
            check=False,
        )
        docker("kill", killed["container_id"])

        def terminated():
            return {e["kernel_id"]: e["data"] for e in events if e["type"] == "kernel-terminated"}

        yield wait_until(reactor, lambda: set(terminated()) >= {"oom", "killed"}, 15, "two kernel-terminated events")
        assert terminated()["oom"]["reason"] == "oom-killed"
        assert terminated()["oom"]["exit_code"] == 137
        assert terminated()["killed"]["reason"] == "self-terminated"
        assert our_containers(agent) == []
        assert homes(agent) == []
        assert (yield client.list_kernels()) == []
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_events_survive_a_reconnect_and_an_agent_restart(agent, tmp_path, reactor, etcd_server):
    seen = []
    client = yield connect(reactor, agent, tmp_path, on_event=seen.append)
    yield client.subscribe(0)
    yield client.create_kernel("ev", IMAGE, {"cpu": 0.5, "mem": "64m"})
    yield wait_until(reactor, lambda: any(e["type"] == "kernel-started" for e in seen), 10, "kernel-started")
    client.close()
    last = max(e["seq"] for e in seen)

    # Events that happen while no manager listens are kept, then replayed.
    other = yield connect(reactor, agent, tmp_path)
    yield other.destroy_kernel("ev")
    other.close()

    agent.stop()
    agent.start()
    agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 15, "/healthz 200 after restart")
    replay = []
    again = yield connect(reactor, agent, tmp_path, on_event=replay.append)
    last_seq = yield again.subscribe(last)
    yield wait_until(reactor, lambda: replay and replay[-1]["seq"] >= last_seq, 10, "the replay")
    types = [e["type"] for e in replay]
    assert replay[0]["seq"] == last + 1
    assert "kernel-terminated" in types and "agent-stopping" in types and "agent-started" in types
    assert [e["seq"] for e in replay] == list(range(last + 1, last_seq + 1))
    again.close()


@pytest_twisted.inlineCallbacks
def test_a_killed_agent_adopts_its_kernels_when_it_comes_back(agent, tmp_path, reactor):
    import signal

    client = yield connect(reactor, agent, tmp_path)
    yield client.create_kernel("survivor", IMAGE, {"cpu": 1, "mem": "128m"})
    yield client.create_kernel("casualty", IMAGE, {"cpu": 0.5, "mem": "64m"})
    answer = yield client.execute("survivor", "query", "remembered = 'still here'")
    assert answer["status"] == "finished"
    casualty = [k for k in (yield client.list_kernels()) if k["kernel_id"] == "casualty"][0]
    client.close()

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    docker("kill", casualty["container_id"])  # dies while no agent watches
    agent.start()
    agent.wait_for(lambda: agent.http("/healthz")[0] == 200, 15, "/healthz 200 after the restart")

    events = []
    again = yield connect(reactor, agent, tmp_path, on_event=events.append)
    try:
        yield wait_until(reactor, lambda: agent.http("/status.json")[0] == 200, 5, "status")
        kernels = yield again.list_kernels()
        assert [k["kernel_id"] for k in kernels] == ["survivor"]
        answer = yield again.execute("survivor", "query", "print(remembered)")
        assert answer["console"] == [["stdout", "still here\n"]]
        info = yield again.get_agent_info()
        assert info["resources"]["cpu"]["used"] == 1
        yield again.subscribe(0)
        yield wait_until(
            reactor,
            lambda: any(e["type"] == "kernel-terminated" and e["kernel_id"] == "casualty" for e in events),
            5,
            "the casualty reported",
        )
        (ended,) = [e for e in events if e["type"] == "kernel-terminated" and e["kernel_id"] == "casualty"]
        assert ended["data"]["reason"] == "self-terminated" and ended["data"]["exit_code"] == 137
        assert homes(agent) == ["survivor"]
        yield again.destroy_kernel("survivor")
    finally:
        again.close()
