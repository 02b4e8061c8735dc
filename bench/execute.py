"""
How long a manager waits for code to run on a kernel, and how fast output streams, against
``docker exec`` and a local Jupyter kernel.

    .venv/bin/python bench/execute.py [--runs 500] [--docker-runs 30] [--megabytes 50]

Needs the ``bench`` extra of pyproject.toml (``jupyter_client`` and ``ipykernel``) for the
Jupyter baseline. Starts its own etcd and a real agent (kernels without a
network), creates one kernel (``bai-kernel/python:3.11``, cpu 1, mem 512m), then in one run:

- agent: ``Execute`` of ``print(1)`` in query mode over AMP until ``finished``, ``--runs``
  times, one at a time;
- docker exec: ``docker exec CONTAINER python3 -c 'print(1)'`` on the kernel's own
  container (the docker CLI as a subprocess), ``--docker-runs`` times;
- Jupyter: a local ``python3`` kernel (``jupyter_client.KernelManager``): ``execute`` of
  ``print(1)`` until the kernel is idle again, ``--runs`` times;
- streaming: a run writing ``--megabytes`` MB to stdout, collected with ``continue`` calls,
  beside ``docker exec CONTAINER cat`` of a file of the same size in the kernel's home.

Prints p50/p99, the ratios and the targets: agent p50 at most 1/20 of docker exec, agent p50
no slower than the local Jupyter kernel, streaming at least 100 MB/s. Everything it made is
removed at the end.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import inlineCallbacks  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from bai_agent.testing.docker_cli import agent_containers, remove_containers  # noqa: E402
from bench.harness import BenchAgent, percentile  # noqa: E402

IMAGE = "bai-kernel/python:3.11"
KERNEL_ID = "bench-exec"
RESOURCES = {"cpu": 1, "mem": "512m"}
CODE = "print(1)"
LINE = 250  # bytes per line of the streamed output
STREAM_FILE = "bench-stream.txt"
STREAM_REPEATS = 3


def stream_code(megabytes):
    lines = megabytes * 1_000_000 // LINE
    return f"import sys; s = ('x' * {LINE - 1} + '\\n') * {lines}; sys.stdout.write(s)"


def check_jupyter():
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench/execute.py: the Jupyter baseline needs the bench extra (jupyter_client, ipykernel): {e}")


# -- agent ------------------------------------------------------------------------------------


@inlineCallbacks
def agent_round_trip(client):
    """Seconds from the Execute call to the finished answer, and the output."""
    started = time.perf_counter()
    answer = yield client.execute(KERNEL_ID, "query", CODE)
    output = answer["console"]
    while answer["status"] != "finished":
        answer = yield client.execute(KERNEL_ID, "continue", run_id=answer["run_id"])
        output += answer["console"]
    elapsed = time.perf_counter() - started
    if output != [["stdout", "1\n"]]:
        raise RuntimeError(f"unexpected output of {CODE!r}: {output!r}")
    return elapsed


@inlineCallbacks
def agent_stream(client, megabytes):
    """(seconds, bytes) for a run writing ``megabytes`` MB, collected with continue calls."""
    options = {"flush_timeout": 0.2}
    received = 0
    started = time.perf_counter()
    answer = yield client.execute(KERNEL_ID, "query", stream_code(megabytes), options=options)
    while True:
        received += sum(len(data) for kind, data in answer["console"] if kind == "stdout")
        if answer["status"] == "finished":
            break
        answer = yield client.execute(KERNEL_ID, "continue", run_id=answer["run_id"], options=options)
    elapsed = time.perf_counter() - started
    expected = megabytes * 1_000_000
    # Query mode shows the value of the last expression too: write()'s count, one line.
    if received not in (expected, expected + len(f"{expected}\n")):
        raise RuntimeError(f"the streamed run gave {received} bytes, not {expected}")
    return elapsed, received


# -- baselines (blocking; each runs in a thread of its own) -----------------------------------


def docker_exec_runs(container, runs):
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(["docker", "exec", container, "python3", "-c", CODE], capture_output=True)
        durations.append(time.perf_counter() - started)
        if done.returncode != 0 or done.stdout != b"1\n":
            raise RuntimeError(f"docker exec failed: {done.returncode} {done.stderr[-500:]!r}")
    return durations


def docker_cat(container, path, expected):
    started = time.perf_counter()
    done = subprocess.run(["docker", "exec", container, "cat", path], capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or len(done.stdout) != expected:
        raise RuntimeError(f"docker exec cat: {done.returncode}, {len(done.stdout)} bytes: {done.stderr[-500:]!r}")
    return elapsed, len(done.stdout)


def jupyter_runs(runs, warmup=20):
    from jupyter_client import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        durations = []
        for index in range(warmup + runs):
            started = time.perf_counter()
            msg_id = client.execute(CODE)
            output = ""
            while True:
                message = client.get_iopub_msg(timeout=30)
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                if message["msg_type"] == "stream":
                    output += message["content"]["text"]
                elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                    break
            elapsed = time.perf_counter() - started
            if output != "1\n":
                raise RuntimeError(f"unexpected Jupyter output {output!r}")
            if index >= warmup:
                durations.append(elapsed)
        return durations
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


# -- the run ----------------------------------------------------------------------------------


@inlineCallbacks
def run(reactor, args):
    bench = BenchAgent(agent_id=f"bench-exec-{os.getpid()}")
    client = None
    created = False
    try:
        bench.start()
        client = yield bench.connect(reactor)
        record = yield client.create_kernel(KERNEL_ID, IMAGE, RESOURCES)
        created = True
        container = record["container_id"]

        print(f"agent: {args.runs} x Execute {CODE!r}", file=sys.stderr)
        for _ in range(20):
            yield agent_round_trip(client)
        agent_times = []
        for _ in range(args.runs):
            agent_times.append((yield agent_round_trip(client)))

        print(f"docker exec: {args.docker_runs} x python3 -c {CODE!r}", file=sys.stderr)
        yield deferToThread(docker_exec_runs, container, 3)
        docker_times = yield deferToThread(docker_exec_runs, container, args.docker_runs)

        print(f"jupyter: {args.runs} x execute {CODE!r} on a local python3 kernel", file=sys.stderr)
        jupyter_times = yield deferToThread(jupyter_runs, args.runs)

        print(f"streaming: {args.megabytes} MB, {STREAM_REPEATS} times each", file=sys.stderr)
        size = args.megabytes * 1_000_000
        write = f"open({STREAM_FILE!r}, 'w').write(('x' * {LINE - 1} + '\\n') * {size // LINE})"
        answer = yield client.execute(KERNEL_ID, "query", write, options={"flush_timeout": 60})
        if answer.get("exit_code") != 0:
            raise RuntimeError(f"could not write the file to stream: {answer!r}")
        agent_streams, docker_streams = [], []
        for _ in range(STREAM_REPEATS):
            agent_streams.append((yield agent_stream(client, args.megabytes)))
            docker_streams.append((yield deferToThread(docker_cat, container, f"/home/work/{STREAM_FILE}", size)))

        report(args, agent_times, docker_times, jupyter_times, agent_streams, docker_streams)
    finally:
        if client is not None:
            if created:
                try:
                    yield client.destroy_kernel(KERNEL_ID)
                except Exception as e:
                    print(f"could not destroy {KERNEL_ID}: {e}", file=sys.stderr)
            client.close()
        if bench.agent is not None:
            bench.agent.stop()
            remove_leftovers(bench.agent.agent_id)
        bench.stop()


def remove_leftovers(agent_id):
    remove_containers(agent_containers(agent_id, check=False))


def report(args, agent_times, docker_times, jupyter_times, agent_streams, docker_streams):
    def ms(seconds):
        return f"{seconds * 1000:9.2f}"

    rows = [
        ("agent (AMP Execute)", agent_times),
        ("docker exec", docker_times),
        ("local Jupyter kernel", jupyter_times),
    ]
    print(f"\nRound trip of {CODE!r} ({IMAGE}, cpu 1, mem 512m)")
    print(f"{'':22} {'runs':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, times in rows:
        print(
            f"{name:22} {len(times):5d} {ms(statistics.median(times))} {ms(percentile(times, 0.99))} "
            f"{ms(statistics.mean(times))}"
        )
    agent_p50 = statistics.median(agent_times)
    docker_p50 = statistics.median(docker_times)
    jupyter_p50 = statistics.median(jupyter_times)

    def rate(streams):
        return statistics.median(size / seconds / 1e6 for seconds, size in streams)

    agent_rate, docker_rate = rate(agent_streams), rate(docker_streams)
    print(f"\nStreaming {args.megabytes} MB of output (median of {STREAM_REPEATS})")
    print(f"{'agent (Execute + continue)':28} {agent_rate:8.1f} MB/s")
    print(f"{'docker exec cat':28} {docker_rate:8.1f} MB/s")
    print(f"agent/docker: {agent_rate / docker_rate:.2f}x")

    def verdict(ok):
        return "meets" if ok else "misses"

    print("\nTargets")
    print(
        f"agent p50 <= 1/20 of docker exec p50: {agent_p50 * 1000:.2f} ms vs {docker_p50 * 1000 / 20:.2f} ms "
        f"(docker exec is {docker_p50 / agent_p50:.1f}x the agent) ({verdict(agent_p50 * 20 <= docker_p50)})"
    )
    print(
        f"agent p50 <= local Jupyter p50: {agent_p50 * 1000:.2f} ms vs {jupyter_p50 * 1000:.2f} ms "
        f"(agent/jupyter {agent_p50 / jupyter_p50:.2f}x) ({verdict(agent_p50 <= jupyter_p50)})"
    )
    print(f"streaming >= 100 MB/s: {agent_rate:.1f} MB/s ({verdict(agent_rate >= 100)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="agent and Jupyter runs (default %(default)s)")
    parser.add_argument("--docker-runs", type=int, default=30, help="docker exec runs (default %(default)s)")
    parser.add_argument("--megabytes", type=int, default=50, help="MB of streamed output (default %(default)s)")
    args = parser.parse_args()
    if args.runs < 1 or args.docker_runs < 1 or args.megabytes < 1:
        parser.error("--runs, --docker-runs and --megabytes must be at least 1")
    check_jupyter()
    react(run, [args])


if __name__ == "__main__":
    main()
