"""
How long a manager waits for a kernel, against what Docker alone takes.

    .venv/bin/python bench/create.py [--kernels 20] [--concurrent 10]

Starts its own etcd and a real agent (kernels without a network), then in one run:

- agent: ``CreateKernel`` until the answer (the kernel's runner has answered), one at a
  time, ``--kernels`` times;
- raw: Engine API create + start of a container of the same image with the same limits,
  mounts and command (the body the agent itself sends), one at a time, as many times;
- then ``--concurrent`` creates of each at once.

Prints p50/p95 and the ratios agent/raw. Target: agent p50 at most 1.25x raw.
Every kernel and container it made is removed at the end.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import gatherResults, inlineCallbacks  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from bai_agent.config import AgentConfig  # noqa: E402
from bai_agent.docker.engine import DockerEngineClient  # noqa: E402
from bai_agent.docker.images import kernel_image_from_inspect  # noqa: E402
from bai_agent.kernels.allocator import Grant  # noqa: E402
from bai_agent.kernels.container import container_config  # noqa: E402
from bai_agent.kernels.kernel import Kernel  # noqa: E402
from bai_agent.kernels.workspace import Workspace  # noqa: E402
from bai_agent.runner import RUNNER_DIR  # noqa: E402
from bench.harness import BenchAgent, percentile  # noqa: E402

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
            kernel = Kernel(
                kernel_id=f"raw{index}",
                image=image,
                grant=grant,
                environ={},
                mounts=(),
                idle_timeout=0,
                exec_timeout=0,
                created_at=0.0,
                last_used=0.0,
            )
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

        report(results, concurrent, args)
    finally:
        if client is not None:
            yield cleanup(docker, client, raw_containers, kernel_ids)
            client.close()
        yield docker.close()
        bench.stop()


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
