"""
How long one statistics sample of many running kernels takes the agent's collector,
against Docker's stats API for the same containers.

    PYTHONPATH=. .venv/bin/python bench/stats.py [--kernels 50] [--rounds 5] [--concurrent 10]

Starts ``--kernels`` containers itself, like kernels (the kernel image, ``sleep
infinity``, network none, a memory limit, a scratch dir each), then in one run:

- agent: one full ``StatsCollector`` round of all of them (cgroup counters, network,
  scratch dir size), kernels only and kernels + node (psutil, and NVML where there is
  one), ``--rounds`` times after one untimed round that locates the cgroups; wall time
  and the collector's own CPU time (``sample_seconds``) per round;
- Docker: ``GET /containers/{id}/stats?stream=false&one-shot=true`` (API 1.41+) for
  every container: one at a time (once: the daemon answers on its 1 s collection tick,
  so this takes about a second per container), ``--concurrent`` at once and all at
  once (``--rounds`` times each); and once the plain ``stream=false`` (without
  ``one-shot`` the daemon waits for a second reading to compute CPU rates, as the
  collector does from its previous round), ``--concurrent`` at once. The CPU time of
  dockerd, containerd and the shims is read from ``/proc`` around each.

Prints a table and the ratios. Target: the collector at least 50x faster than the API.
Every container it made is removed at the end, also after a failure or Ctrl-C.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from urllib.parse import quote, urlencode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import treq  # noqa: E402
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks  # noqa: E402
from twisted.internet.endpoints import UNIXClientEndpoint  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThreadPool  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from bai_agent.docker.engine import DockerEngineClient, parse_docker_host  # noqa: E402
from bai_agent.node.gpus import discover_gpus  # noqa: E402
from bai_agent.stats import CgroupReader, GpuStats, KernelTarget, NodeStats, StatsCollector  # noqa: E402
from bai_agent.testing.docker_host import docker_host_from_env, docker_request, remove_container  # noqa: E402

IMAGE = "bai-kernel/python:3.11"
API = "v1.41"  # one-shot came with 1.41, the API of Docker 20.10
LABEL_KEY = "ai.backend.agent-id"
LABEL_VALUE = f"bench-stats-{os.getpid()}"
TARGET = 50.0


class _UnixEndpointFactory:
    def __init__(self, reactor, path):
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path)


DOCKER_PROCESSES = ("dockerd", "containerd", "containerd-shim-runc-v2", "containerd-shim")


def docker_cpu_seconds():
    """
    CPU time of Docker's processes (dockerd, containerd, the shims: a stats call goes
    through all three); None when there is no dockerd to see (a remote daemon).
    """
    total, found = 0.0, False
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in DOCKER_PROCESSES:
            found = found or process.info["name"] == "dockerd"
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total if found else None


@inlineCallbacks
def measured(call):
    """``(wall seconds, this process's CPU seconds, Docker's CPU seconds or None)`` of ``call()``."""
    docker_before = docker_cpu_seconds()
    cpu_before = time.process_time()
    started = time.perf_counter()
    yield call()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    docker_after = docker_cpu_seconds()
    docker_cpu = None if docker_before is None or docker_after is None else docker_after - docker_before
    return wall, cpu, docker_cpu


class DockerStats:
    """The stats API over the daemon's UNIX socket, with treq."""

    def __init__(self, reactor, docker_host, connections):
        address = parse_docker_host(docker_host)
        if address.scheme != "unix":
            raise SystemExit("this bench talks to Docker over its UNIX socket (DOCKER_HOST=unix://...)")
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = connections
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, address.path), pool=self._pool)
        self._http = treq.client.HTTPClient(agent)
        self.failures = 0

    @inlineCallbacks
    def one(self, container_id, one_shot):
        query = {"stream": "false"}
        if one_shot:
            query["one-shot"] = "true"
        url = f"http://docker/{API}/containers/{quote(container_id)}/stats?{urlencode(query)}"
        response = yield self._http.get(url)
        body = yield response.json()
        if response.code != 200 or "memory_stats" not in body or "cpu_stats" not in body:
            self.failures += 1

    def all(self, container_ids, one_shot, concurrent):
        if concurrent <= 1:

            @inlineCallbacks
            def sequential():
                for container_id in container_ids:
                    yield self.one(container_id, one_shot)

            return sequential()
        limit = DeferredSemaphore(concurrent)
        return gatherResults(
            [limit.run(self.one, container_id, one_shot) for container_id in container_ids], consumeErrors=True
        )

    def close(self):
        return self._pool.closeCachedConnections()


@inlineCallbacks
def start_containers(docker, count, scratch_root, made, concurrent=5):
    """Start ``count`` kernel-like containers; ``made`` gets their ids, in index order."""
    made.extend([None] * count)

    @inlineCallbacks
    def start(index):
        home = os.path.join(scratch_root, f"k{index}")
        os.mkdir(home)
        body = {
            "Image": IMAGE,
            "Entrypoint": [],
            "Cmd": ["sleep", "infinity"],
            "Labels": {LABEL_KEY: LABEL_VALUE},
            "WorkingDir": "/home/work",
            "HostConfig": {
                "Binds": [f"{home}:/home/work:rw"],
                "NetworkMode": "none",
                "Memory": 64 << 20,
                "MemorySwap": 64 << 20,
                "PidsLimit": 64,
            },
        }
        container_id = yield docker.create_container(f"{LABEL_VALUE}-{index}", body)
        made[index] = container_id
        yield docker.start_container(container_id)

    limit = DeferredSemaphore(concurrent)
    yield gatherResults([limit.run(start, index) for index in range(count)], consumeErrors=True)


def remove_our_containers():
    """Blocking, and independent of the reactor: every container labelled by this run."""
    docker_host = docker_host_from_env()
    filters = f'{{"label": ["{LABEL_KEY}={LABEL_VALUE}"]}}'
    try:
        query = urlencode({"all": "1", "filters": filters})
        status, body = docker_request(docker_host, "GET", "/containers/json?" + query)
    except OSError as error:
        print(f"could not list the bench's containers: {error}", file=sys.stderr)
        return
    if status != 200:
        print(f"could not list the bench's containers: HTTP {status}", file=sys.stderr)
        return
    for container in json.loads(body):
        try:
            remove_container(container["Id"], docker_host)
        except Exception as error:
            print(f"could not remove {container['Id'][:12]}: {error}", file=sys.stderr)


@inlineCallbacks
def run(reactor, args, scratch_root):
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    docker = DockerEngineClient(reactor, docker_host)
    api = DockerStats(reactor, docker_host, max(args.concurrent, args.kernels))
    pool = ThreadPool(minthreads=1, maxthreads=1, name="bench-stats")
    pool.start()
    container_ids = []
    gpus = None
    try:
        print(f"starting {args.kernels} containers ...", file=sys.stderr)
        yield start_containers(docker, args.kernels, scratch_root, container_ids)
        targets = [
            KernelTarget(f"k{index}", container_id, os.path.join(scratch_root, f"k{index}"))
            for index, container_id in enumerate(container_ids)
        ]

        def run_blocking(f, *a):
            return deferToThreadPool(reactor, pool, f, *a)

        reader = CgroupReader()
        gpus = GpuStats(_nvml(), discover_gpus(_nvml()))
        collectors = {
            "agent, kernels": StatsCollector(reactor, reader, lambda: targets, run_blocking),
            "agent, kernels+node": StatsCollector(
                reactor, reader, lambda: targets, run_blocking, node=NodeStats(scratch_root), gpus=gpus
            ),
        }
        results = {}
        for name, collector in collectors.items():
            yield collector.sample()  # untimed: locates every cgroup, opens NVML
            rows = []
            for _ in range(args.rounds):
                wall, cpu, _docker_cpu = yield measured(collector.sample)
                rows.append((wall, cpu, collector.sample_seconds))
            results[name] = rows
        sampled = collectors["agent, kernels"].latest_all()
        if len(sampled) != args.kernels:
            raise RuntimeError(f"the collector sampled {len(sampled)} of {args.kernels} kernels")
        problems = reader.drain_problems()
        if problems:
            print(f"cgroup problems: {problems[:5]}", file=sys.stderr)

        # Docker 20.10 collects container stats on a 1 s tick and answers a stats call
        # at the next tick, one-shot or not: one at a time costs about a second each,
        # so that row is measured once; the concurrent ones --rounds times.
        docker_rows = {}
        yield api.all(container_ids[:2], one_shot=True, concurrent=1)  # open the connection
        plan = [
            ("docker one-shot, sequential", True, 1, 1),
            (f"docker one-shot, {args.concurrent} at once", True, args.concurrent, args.rounds),
            (f"docker one-shot, all {args.kernels} at once", True, args.kernels, args.rounds),
        ]
        if not args.skip_two_sample:
            plan.append((f"docker stream=false, {args.concurrent} at once", False, args.concurrent, 1))
        for name, one_shot, concurrent, rounds in plan:
            print(f"{name} ...", file=sys.stderr)
            rows = []
            for _ in range(rounds):
                rows.append((yield measured(partial(api.all, container_ids, one_shot, concurrent))))
            docker_rows[name] = rows
        if api.failures:
            raise RuntimeError(f"{api.failures} Docker stats calls failed")
        report(args, results, docker_rows, reader.version)
    finally:
        if gpus is not None:
            gpus.close()
        pool.stop()
        yield api.close()
        print("removing the containers ...", file=sys.stderr)
        yield gatherResults(
            [docker.remove_container(container_id, force=True) for container_id in container_ids if container_id],
            consumeErrors=True,
        ).addErrback(lambda failure: print(f"removal: {failure.value}", file=sys.stderr))
        yield docker.close()


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def report(args, agent_rows, docker_rows, cgroup_version):
    def ms(seconds):
        return f"{seconds * 1000:9.2f}"

    def median(rows, column):
        values = [row[column] for row in rows if row[column] is not None]
        return statistics.median(values) if values else None

    n = args.kernels
    print(
        f"\nOne statistics sample of {n} running containers ({IMAGE}, sleep infinity, network none), "
        f"cgroup v{cgroup_version}; medians"
    )
    print(f"{'':36} {'wall ms':>9} {'per ctr':>9} {'our CPU':>9} {'thread':>9} {'Docker CPU':>10}")
    walls, costs = {}, {}
    for name, rows in agent_rows.items():
        wall, cpu, thread = median(rows, 0), median(rows, 1), median(rows, 2)
        walls[name], costs[name] = wall, cpu
        print(f"{name:36} {ms(wall)} {ms(wall / n)} {ms(cpu)} {ms(thread)} {'-':>10}")
    for name, rows in docker_rows.items():
        wall, cpu, docker_cpu = median(rows, 0), median(rows, 1), median(rows, 2)
        walls[name] = wall
        costs[name] = cpu + (docker_cpu or 0.0)
        docker_text = f"{docker_cpu * 1000:10.1f}" if docker_cpu is not None else f"{'?':>10}"
        print(f"{name:36} {ms(wall)} {ms(wall / n)} {ms(cpu)} {'-':>9} {docker_text}")
    print(
        "(ms per round. our CPU: this process's CPU time (the agent's, or the client's for Docker);\n"
        " thread: the collector's worker-thread CPU time, its sample_seconds; Docker CPU: dockerd,\n"
        " containerd and the shims, read from /proc around the round, coarse: 10 ms ticks)"
    )
    agent = walls["agent, kernels"]
    print(
        f"\nagent CPU time per sample: {costs['agent, kernels'] * 1000:.2f} ms a round of {n} kernels "
        f"({costs['agent, kernels'] / n * 1e6:.0f} us a kernel); "
        f"{costs['agent, kernels+node'] * 1000:.2f} ms with the node"
    )
    print(f"\n{'Docker / agent (kernels only)':36} {'wall':>9} {'CPU':>9}")
    for name in docker_rows:
        print(f"{name:36} {walls[name] / agent:8.1f}x {costs[name] / costs['agent, kernels']:8.1f}x")
    fastest = min(docker_rows, key=walls.get)
    ratio = walls[fastest] / agent
    verdict = "meets" if ratio >= TARGET else "misses"
    print(
        f"\ntarget: at least {TARGET:.0f}x faster than the API; against its fastest way here ({fastest}): "
        f"{ratio:.1f}x ({verdict})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--skip-two-sample", action="store_true", help="leave out the slow plain stream=false row")
    args = parser.parse_args()
    if args.kernels < 1 or args.rounds < 1 or args.concurrent < 1:
        parser.error("--kernels, --rounds and --concurrent must be at least 1")
    scratch_root = tempfile.mkdtemp(prefix="bai-bench-stats-")
    try:
        react(run, [args, scratch_root])
    finally:
        # Also after Ctrl-C, when the reactor stopped before run's own clean-up could.
        remove_our_containers()
        shutil.rmtree(scratch_root, ignore_errors=True)


if __name__ == "__main__":
    main()
