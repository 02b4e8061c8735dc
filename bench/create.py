"""
How long a manager waits for a kernel, against what Docker alone takes.

    .venv/bin/python bench/create.py [--kernels 20] [--concurrent 10]

Starts its own etcd and a real agent (kernels without a network), then in one run:

- agent: ``CreateKernel`` until the answer (the kernel's runner has answered), one at a
  time, ``--kernels`` times;
- raw: Engine API create + start of a container of the same image with the same limits,
  mounts and command (the body the agent itself sends), one at a time, as many times;
- then ``--concurrent`` creates of each at once;
- warm: the pool is set to ``--kernels`` containers (etcd's ``warm_pool``, live), and once
  it is full, ``CreateKernel`` claims one, one at a time (the pool refilled, untimed, before
  the next); then a burst of ``--kernels`` claims at once from a full pool.

Prints p50/p95 and the ratios agent/raw and warm/raw, and where a claim's time goes (the
agent's log: the limits update, the rename, the directories). Targets: cold agent p50 at
most 1.25x raw; warm p50 at least 10x faster than raw. Every kernel and container it made
is removed at the end.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import gatherResults, inlineCallbacks  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from bai_agent.config import AgentConfig  # noqa: E402
from bai_agent.docker.engine import DockerEngineClient  # noqa: E402
from bai_agent.docker.images import kernel_image_from_inspect  # noqa: E402
from bai_agent.kernels.allocator import Grant  # noqa: E402
from bai_agent.kernels.container import container_config  # noqa: E402
from bai_agent.kernels.kernel import Kernel  # noqa: E402
from bai_agent.kernels.workspace import Workspace  # noqa: E402
from bai_agent.runner import RUNNER_DIR  # noqa: E402
from bai_agent.testing.docker_cli import agent_containers, remove_containers  # noqa: E402
from bench.harness import BenchAgent, percentile  # noqa: E402
from tests.functional.agent_process import etcd_put  # noqa: E402

IMAGE = "bai-kernel/python:3.11"
# One whole core (pinned, no CFS quota) for the kernels measured one at a time: a quota
# would throttle the runner's Python start-up, which raw containers are not asked to do.
# Each is destroyed, untimed, before the next. The concurrent ones share the machine.
RESOURCES = {"cpu": 1, "mem": "128m"}
CONCURRENT_RESOURCES = {"cpu": 0.2, "mem": "64m"}


@inlineCallbacks
def timed(call):
    started = time.perf_counter()
    yield call()
    return time.perf_counter() - started


@inlineCallbacks
def run(reactor, args):
    bench = BenchAgent(agent_id=f"bench-create-{os.getpid()}")
    work = str(bench.work)
    docker = DockerEngineClient(reactor, os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    raw_containers = []
    kernel_ids = []
    client = None
    try:
        bench.start()
        client = yield bench.connect(reactor)

        # The raw body: what the agent sends for such a kernel, in a scratch dir of our own.
        image = kernel_image_from_inspect(IMAGE, (yield docker.inspect_image(IMAGE)))
        config = AgentConfig(agent_id="bench-raw", scratch_root=os.path.join(work, "raw"), state_dir=work)
        os.makedirs(config.scratch_root)
        grants = {
            "one": Grant(kernel_id="raw", cpu=1.0, mem=128 << 20, cpuset=(1,), cpu_quota_us=None, cuda_devices=()),
            "concurrent": Grant(kernel_id="raw", cpu=0.2, mem=64 << 20, cpuset=(), cpu_quota_us=20000, cuda_devices=()),
        }
        mode = {"now": "one"}

        def raw_body(index):
            grant = grants[mode["now"]]
            kernel = Kernel.bare(f"raw{index}", image, grant)
            workspace = Workspace(config.scratch_root, os.path.join(work, "raw-state"), kernel.kernel_id)
            os.makedirs(workspace.run_dir, exist_ok=True)
            os.makedirs(workspace.scratch_dir, exist_ok=True)
            return container_config(kernel, workspace, "bench-raw", RUNNER_DIR, "none", 1024)

        counter = iter(range(10**6))

        @inlineCallbacks
        def raw_create():
            index = next(counter)
            body = raw_body(index)
            container = yield docker.create_container(f"bench-raw-{os.getpid()}-{index}", body)
            raw_containers.append(container)
            yield docker.start_container(container)

        @inlineCallbacks
        def agent_create():
            kernel_id = f"bench{next(counter)}"
            kernel_ids.append(kernel_id)
            resources = RESOURCES if mode["now"] == "one" else CONCURRENT_RESOURCES
            yield client.create_kernel(kernel_id, IMAGE, resources)

        # Warm up both paths once (image layers in the page cache, connections open).
        yield raw_create()
        yield agent_create()

        results = {"agent": [], "raw": []}
        yield cleanup(docker, client, raw_containers, kernel_ids)
        for _ in range(args.kernels):
            # Interleaved, so that both see the same machine state.
            results["raw"].append((yield timed(raw_create)))
            results["agent"].append((yield timed(agent_create)))
            yield cleanup(docker, client, raw_containers, kernel_ids)

        mode["now"] = "concurrent"
        concurrent = {}
        for name, create in (("raw", raw_create), ("agent", agent_create)):
            started = time.perf_counter()
            durations = yield gatherResults([timed(create) for _ in range(args.concurrent)], consumeErrors=True)
            concurrent[name] = (time.perf_counter() - started, durations)
            yield cleanup(docker, client, raw_containers, kernel_ids)

        warm = yield warm_creates(reactor, bench, client, kernel_ids, args)
        report(results, concurrent, args)
        report_warm(warm, results["raw"], bench, args)
    finally:
        if client is not None:
            yield cleanup(docker, client, raw_containers, kernel_ids)
            client.close()
        yield docker.close()
        bench.stop()
        # Whatever an interrupted run left (the pool's containers, say): removed by our label.
        remove_containers(agent_containers(bench.agent_id))


def pool_ready(bench):
    status, body = bench.agent.http("/status.json")
    if status != 200:
        return (0, 1)
    state = json.loads(body)["pool"]["images"].get(IMAGE, {})
    return state.get("ready", 0), state.get("filling", 0)


@inlineCallbacks
def full_pool(reactor, bench, size, timeout=300):
    deadline = time.monotonic() + timeout
    while pool_ready(bench) != (size, 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool did not fill: {pool_ready(bench)}")
        yield deferLater(reactor, 0.05, lambda: None)


@inlineCallbacks
def warm_creates(reactor, bench, client, kernel_ids, args):
    etcd_put(bench.etcd.url, "/bai/bench/config/agent/warm_pool", json.dumps({IMAGE: args.kernels}))
    yield full_pool(reactor, bench, args.kernels)
    counter = iter(range(10**6))

    def create(resources=RESOURCES):
        kernel_id = f"warm{next(counter)}"
        kernel_ids.append(kernel_id)
        return client.create_kernel(kernel_id, IMAGE, resources)

    one_at_a_time = []
    for _ in range(args.kernels):
        one_at_a_time.append((yield timed(create)))
        yield cleanup(None, client, [], kernel_ids)
        yield full_pool(reactor, bench, args.kernels)
    started = time.perf_counter()
    burst = yield gatherResults(
        [timed(lambda: create(CONCURRENT_RESOURCES)) for _ in range(args.kernels)], consumeErrors=True
    )
    burst_wall = time.perf_counter() - started
    records = yield client.list_kernels()
    warm_in_burst = sum(1 for record in records if record.get("warm"))
    yield cleanup(None, client, [], kernel_ids)
    etcd_put(bench.etcd.url, "/bai/bench/config/agent/warm_pool", "{}")
    yield full_pool(reactor, bench, 0)  # a graceful stop would keep the pool's containers
    return {"one": one_at_a_time, "burst": burst, "burst_wall": burst_wall, "burst_warm": warm_in_burst}


def claim_steps(log_text, count):
    """Each step's ms into the first ``count`` claims, from the agent's 'started warm' log lines (JSON)."""
    steps = {}
    seen = 0
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "started warm" not in str(entry.get("log_format", "")):
            continue
        seen += 1
        if seen > count:
            break
        for step, at in re.findall(r"(\w+) at ([0-9.]+) ms", str(entry.get("steps", ""))):
            steps.setdefault(step, []).append(float(at))
        steps.setdefault("answered", []).append(float(entry.get("elapsed", 0)) * 1000)
    return {step: statistics.median(values) for step, values in steps.items()}


def report_warm(warm, raw, bench, args):
    one, raw_p50 = warm["one"], statistics.median(raw)
    print(f"\nWarm CreateKernel (claimed from a full pool of {args.kernels}), {len(one)} one at a time")
    print(f"{'':6} {'warm ms':>9} {'raw ms':>9} {'raw/warm':>10}")
    for name, w, r in (
        ("p50", statistics.median(one), raw_p50),
        ("p95", percentile(one, 0.95), percentile(raw, 0.95)),
    ):
        print(f"{name:6} {w * 1000:8.2f} {r * 1000:8.1f} {r / w:9.1f}x")
    steps = claim_steps(bench.agent.log_text(), len(one))
    if steps:
        print(
            "where a claim's time goes (median ms into the claim, done at): "
            + ", ".join(f"{step} {at:.1f}" for step, at in sorted(steps.items(), key=lambda item: item[1]))
        )
    burst = warm["burst"]
    print(
        f"burst of {args.kernels} claims at once (cpu 0.2 each): wall {warm['burst_wall'] * 1000:.1f} ms, "
        f"p50 {statistics.median(burst) * 1000:.1f} ms, max {max(burst) * 1000:.1f} ms, "
        f"{warm['burst_warm']} of {args.kernels} warm"
    )
    ratio = raw_p50 / statistics.median(one)
    verdict = "meets" if ratio >= 10 else "misses"
    print(f"target: warm p50 at least 10x faster than raw create + start: {ratio:.1f}x ({verdict})")


@inlineCallbacks
def cleanup(docker, client, raw_containers, kernel_ids):
    while raw_containers:
        container = raw_containers.pop()
        try:
            yield docker.remove_container(container, force=True)
        except Exception as e:
            print(f"could not remove {container}: {e}", file=sys.stderr)
    while kernel_ids:
        kernel_id = kernel_ids.pop()
        try:
            yield client.destroy_kernel(kernel_id)
        except Exception as e:
            print(f"could not destroy {kernel_id}: {e}", file=sys.stderr)


def report(results, concurrent, args):
    def ms(seconds):
        return f"{seconds * 1000:8.1f}"

    agent, raw = results["agent"], results["raw"]
    rows = [
        ("p50", statistics.median(agent), statistics.median(raw)),
        ("p95", percentile(agent, 0.95), percentile(raw, 0.95)),
        ("mean", statistics.mean(agent), statistics.mean(raw)),
    ]
    print(f"\nCreate until running, {args.kernels} kernels one at a time ({IMAGE}, cpu 1 pinned, mem 128m)")
    print(f"{'':6} {'agent ms':>9} {'raw ms':>9} {'agent/raw':>10}")
    for name, a, r in rows:
        print(f"{name:6} {ms(a)} {ms(r)} {a / r:9.2f}x")
    print(f"\n{args.concurrent} concurrent creates (cpu 0.2 each, mem 64m)")
    print(f"{'':6} {'wall ms':>9} {'p50 ms':>9} {'max ms':>9}")
    for name in ("agent", "raw"):
        wall, durations = concurrent[name]
        print(f"{name:6} {ms(wall)} {ms(statistics.median(durations))} {ms(max(durations))}")
    wall_ratio = concurrent["agent"][0] / concurrent["raw"][0]
    print(f"agent/raw wall time: {wall_ratio:.2f}x")
    p50_ratio = statistics.median(agent) / statistics.median(raw)
    verdict = "meets" if p50_ratio <= 1.25 else "misses"
    print(f"\ntarget: agent p50 <= 1.25x raw: {p50_ratio:.2f}x ({verdict})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=10)
    args = parser.parse_args()
    if args.kernels < 1 or args.concurrent < 1:
        parser.error("--kernels and --concurrent must be at least 1")
    react(run, [args])


if __name__ == "__main__":
    main()
