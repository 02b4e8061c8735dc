"""
How the agent holds up under many managers at once, and what it costs with many idle kernels.

    .venv/bin/python bench/load.py [--duration 60] [--connections 50] [--kernels 20]
                                   [--idle-kernels 100] [--heartbeat-interval 3]

Starts its own etcd and a real agent (kernels without a network, ``--heartbeat-interval``
3 s, the production default), then:

- load: creates ``--kernels`` kernels (``bai-kernel/python:3.11``, cpu ``--kernel-cpu``
  0.05, mem 96m) and opens ``--connections`` authenticated AMP connections; connection
  ``i`` drives kernel ``i % kernels`` with ``Execute`` of ``print(1)`` in query mode (and
  ``continue`` until ``finished``) for ``--duration`` seconds. A kernel runs one run at a
  time, so the connections of one kernel take turns through a lock of that kernel on this
  side: a ``RUN_CONFLICT`` therefore means the agent still held a run it had answered as
  finished, and counts as an error like every other failure, wrong output or dropped
  connection. Latency is from the ``Execute`` call (the lock held) to the ``finished``
  answer.
- heartbeat: all along, a thread samples the agent's etcd lease every 100 ms (its remaining
  TTL through etcd's ``/v3/lease/timetolive``, which jumps up at every keep-alive); the
  largest gap between two keep-alives less the interval is the delay. ``/status.json``
  (``etcd.heartbeat_delay_max``, the agent's own measure) is read too when the agent has
  it. The verdict takes the largest of the measures there are.
- idle: destroys those kernels, creates ``--idle-kernels`` (cpu 0.01, mem 64m; 10 at a
  time), waits until all run and ``--settle`` seconds more, then samples the agent process
  for ``--idle-duration`` seconds (default ``--duration``): largest RSS, and CPU time
  (user + system) over wall time as a share of one core.

Targets: errors 0; heartbeat delay under one interval; idle RSS under 150 MB (10^6 bytes)
and idle CPU under 2 % of a core. Exit status 1 when there was any error (or the bench
failed), 2 when only a performance target was missed, else 0. Every kernel, container and
process it made is removed at the end, also on failure and Ctrl-C.
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
from twisted.internet.defer import DeferredLock, DeferredSemaphore, gatherResults, inlineCallbacks  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from bai_agent.protocol.errors import AgentError  # noqa: E402
from bai_agent.testing.docker_cli import agent_containers, remove_containers  # noqa: E402
from bench.harness import BenchAgent, percentile  # noqa: E402

IMAGE = "bai-kernel/python:3.11"
CODE = "print(1)"
EXPECTED = [["stdout", "1\n"]]
LOAD_RESOURCES = {"cpu": 0.05, "mem": "96m"}  # cpu: --kernel-cpu
IDLE_RESOURCES = {"cpu": 0.01, "mem": "64m"}
RSS_TARGET = 150e6  # bytes
CPU_TARGET = 2.0  # percent of one core
SAMPLE_PERIOD = 0.1  # seconds between heartbeat samples
ERROR_PAUSE = 0.05  # seconds a connection waits after an error, so that a broken kernel does not spin


# -- the heartbeat, seen from etcd (a thread: blocking HTTP, its own clock) ----------------


def etcd_post(url, path, body, timeout=2.0):
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class HeartbeatWatcher:
    """
    Samples the remaining TTL of the agent's lease every ``SAMPLE_PERIOD`` and keeps, per
    phase, the gaps between keep-alives (the TTL jumps up at each; a gap is known to about
    one sample). The lease id comes from the agent's record, read again whenever the lease
    is gone.
    """

    def __init__(self, etcd_url, record_key):
        self.etcd_url = etcd_url
        self.key = base64.b64encode(record_key.encode()).decode()
        self.phase = "start"
        self.gaps = {}  # phase -> [seconds]
        self.lowest_ttl = {}  # phase -> the lowest remaining TTL seen
        self.granted_ttl = None
        self.sample_errors = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-watcher", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def mark(self, phase):
        """Gaps that end from now on belong to ``phase``."""
        self.phase = phase

    def largest(self, phase):
        """(largest gap, number of gaps) in ``phase``; (None, 0) when there was none."""
        values = self.gaps.get(phase) or []
        return (max(values), len(values)) if values else (None, 0)

    def _lease_of_record(self):
        document = etcd_post(self.etcd_url, "/v3/kv/range", {"key": self.key})
        kvs = document.get("kvs") or []
        return int(kvs[0].get("lease", 0)) if kvs else None

    def _run(self):
        lease_id = last_ttl = last_keepalive = None
        while not self._stop.wait(SAMPLE_PERIOD):
            try:
                if lease_id is None:
                    lease_id, last_ttl, last_keepalive = self._lease_of_record(), None, None
                    if not lease_id:
                        lease_id = None
                        continue  # not registered (yet, or any more)
                answer = etcd_post(self.etcd_url, "/v3/lease/timetolive", {"ID": lease_id})
                now = time.monotonic()
                ttl = int(answer.get("TTL", -1))
            except (OSError, ValueError, KeyError) as e:
                self.sample_errors += 1
                if self.sample_errors <= 3:
                    print(f"heartbeat watcher: {e}", file=sys.stderr)
                continue
            if ttl < 0:
                lease_id = None  # revoked or expired: the agent registers with a new one
                continue
            self.samples += 1
            self.granted_ttl = int(answer.get("grantedTTL", 0))
            phase = self.phase
            self.lowest_ttl[phase] = min(ttl, self.lowest_ttl.get(phase, ttl))
            if last_ttl is not None and ttl > last_ttl:
                if last_keepalive is not None:
                    self.gaps.setdefault(phase, []).append(now - last_keepalive)
                last_keepalive = now
            last_ttl = ttl


# -- phase 1: many managers -------------------------------------------------------------------


class LoadResult:
    def __init__(self):
        self.latencies = []
        self.errors = {}  # kind -> count
        self.first_errors = []
        self.agent_cpu = self.agent_rss = self.bench_cpu = self.throttling = None
        self.started = self.ended = None

    def error(self, kind, detail):
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{kind}: {detail}")

    @property
    def error_count(self):
        return sum(self.errors.values())


def error_kind(failure_or_exception):
    error = getattr(failure_or_exception, "value", failure_or_exception)
    if isinstance(error, AgentError):
        return error.code.decode()
    return type(error).__name__


@inlineCallbacks
def execute_once(client, kernel_id):
    """Run ``CODE`` until finished; the output."""
    answer = yield client.execute(kernel_id, "query", CODE)
    output = list(answer["console"])
    while answer["status"] == "continued":
        answer = yield client.execute(kernel_id, "continue", run_id=answer["run_id"])
        output += answer["console"]
    if answer["status"] != "finished":
        raise RuntimeError(f"run ended with status {answer['status']!r}")
    return output


@inlineCallbacks
def drive(reactor, client, kernel_id, lock, deadline, result):
    """One manager connection: Execute on its kernel, one at a time, until ``deadline``."""
    while time.monotonic() < deadline and not client.disconnected.called:
        yield lock.acquire()
        failed = False
        try:
            started = time.perf_counter()
            output = yield execute_once(client, kernel_id)
            elapsed = time.perf_counter() - started
            if output == EXPECTED:
                result.latencies.append(elapsed)
            else:
                result.error("wrong-output", f"{kernel_id}: {output!r}")
        except Exception as e:
            failed = True
            result.error(error_kind(e), f"{kernel_id}: {e}")
        finally:
            lock.release()
        if failed:
            yield deferLater(reactor, ERROR_PAUSE, lambda: None)


@inlineCallbacks
def load_phase(reactor, bench, admin, args, kernel_ids, process, watcher):
    watcher.mark("load-setup")
    result = LoadResult()
    create = DeferredSemaphore(args.create_batch)
    print(f"load: creating {args.kernels} kernels {LOAD_RESOURCES}", file=sys.stderr)
    records = yield gatherResults(
        [create.run(create_kernel, admin, f"load{i}", LOAD_RESOURCES, kernel_ids) for i in range(args.kernels)],
        consumeErrors=True,
    )
    containers = [record["container_id"] for record in records]
    names = [f"load{i}" for i in range(args.kernels)]
    for name in names:  # the first run of each interpreter, untimed
        output = yield execute_once(admin, name)
        if output != EXPECTED:
            raise RuntimeError(f"warm-up on {name} gave {output!r}")

    print(f"load: opening {args.connections} connections", file=sys.stderr)
    clients = yield gatherResults([bench.connect(reactor) for _ in range(args.connections)], consumeErrors=True)
    closing = []

    def dropped(_, index):
        if not closing:
            result.error("connection-lost", f"connection {index} closed during the run")
        return None

    for index, client in enumerate(clients):
        client.disconnected.addCallback(dropped, index)
    locks = {name: DeferredLock() for name in names}
    try:
        print(f"load: {args.connections} connections x Execute {CODE!r} for {args.duration} s", file=sys.stderr)
        watcher.mark("load")
        throttling_before = throttling(containers)
        cpu_before, own_before = process.cpu_times(), OWN_PROCESS.cpu_times()
        result.started = time.monotonic()
        deadline = result.started + args.duration
        workers = []
        for index, client in enumerate(clients):
            name = names[index % len(names)]
            workers.append(drive(reactor, client, name, locks[name], deadline, result))
        yield gatherResults(workers, consumeErrors=True)
        result.ended = time.monotonic()
        watcher.mark("idle-setup")
        own_after = OWN_PROCESS.cpu_times()
        result.bench_cpu = cpu_share(own_before, own_after, result.ended - result.started)
        result.throttling = throttling_difference(throttling_before, throttling(containers))
        try:
            result.agent_cpu = cpu_share(cpu_before, process.cpu_times(), result.ended - result.started)
            result.agent_rss = process.memory_info().rss
        except psutil.Error as e:
            result.error("agent-gone", f"the agent process: {e}")
    finally:
        closing.append(True)
        for client in clients:
            client.close()
    return result


OWN_PROCESS = psutil.Process()


def cpu_stat_path(container_id):
    """The cgroup ``cpu.stat`` of a container (cgroup v1 or v2, either Docker driver), or None."""
    for path in (
        f"/sys/fs/cgroup/cpu/docker/{container_id}/cpu.stat",
        f"/sys/fs/cgroup/cpu,cpuacct/docker/{container_id}/cpu.stat",
        f"/sys/fs/cgroup/cpu/system.slice/docker-{container_id}.scope/cpu.stat",
        f"/sys/fs/cgroup/docker/{container_id}/cpu.stat",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat",
    ):
        if os.path.exists(path):
            return path
    return None


def throttling(containers):
    """Summed CFS periods, throttled periods and throttled seconds of ``containers``, or None."""
    totals = [0, 0, 0.0]
    for container in containers:
        path = cpu_stat_path(container)
        if path is None:
            return None
        try:
            with open(path) as stat:
                fields = dict(line.split() for line in stat if line.strip())
        except (OSError, ValueError):
            return None
        totals[0] += int(fields.get("nr_periods", 0))
        totals[1] += int(fields.get("nr_throttled", 0))
        if "throttled_usec" in fields:  # v2
            totals[2] += int(fields["throttled_usec"]) / 1e6
        else:  # v1: nanoseconds
            totals[2] += int(fields.get("throttled_time", 0)) / 1e9
    return totals


def throttling_difference(before, after):
    if before is None or after is None:
        return None
    return [b - a for a, b in zip(before, after)]


# -- phase 2: many idle kernels ---------------------------------------------------------------


def cpu_share(before, after, wall):
    """CPU time of a process over ``wall`` seconds, in percent of one core."""
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / wall if wall > 0 else 0.0


@inlineCallbacks
def idle_phase(reactor, admin, args, kernel_ids, process, watcher):
    print(f"idle: destroying the load kernels, creating {args.idle_kernels} kernels {IDLE_RESOURCES}", file=sys.stderr)
    yield destroy_all(admin, kernel_ids, args.create_batch)
    create = DeferredSemaphore(args.create_batch)
    started = time.monotonic()
    progress = {"done": 0}

    @inlineCallbacks
    def one(index):
        yield create_kernel(admin, f"idle{index}", IDLE_RESOURCES, kernel_ids)
        progress["done"] += 1
        if progress["done"] % 10 == 0:
            print(f"idle: {progress['done']} kernels running ({time.monotonic() - started:.0f} s)", file=sys.stderr)

    yield gatherResults([create.run(one, i) for i in range(args.idle_kernels)], consumeErrors=True)
    create_seconds = time.monotonic() - started
    records = yield admin.list_kernels()
    running = sum(1 for record in records if record["status"] == "running")
    if running != args.idle_kernels:
        raise RuntimeError(f"{running} of {args.idle_kernels} idle kernels are running")
    print(f"idle: all running after {create_seconds:.1f} s; settling {args.settle} s", file=sys.stderr)
    yield deferLater(reactor, args.settle, lambda: None)

    print(f"idle: sampling the agent (pid {process.pid}) for {args.idle_duration} s", file=sys.stderr)
    rss = []
    watcher.mark("idle")
    wall_before, cpu_before = time.monotonic(), process.cpu_times()
    deadline = wall_before + args.idle_duration
    while True:
        rss.append(process.memory_info().rss)
        now = time.monotonic()
        if now >= deadline:
            break
        yield deferLater(reactor, min(1.0, deadline - now), lambda: None)
    wall_after, cpu_after = time.monotonic(), process.cpu_times()
    watcher.mark("end")
    return {
        "create_seconds": create_seconds,
        "rss_max": max(rss),
        "rss_mean": statistics.mean(rss),
        "cpu": cpu_share(cpu_before, cpu_after, wall_after - wall_before),
        "wall": wall_after - wall_before,
        "threads": process.num_threads(),
        "fds": process.num_fds(),
    }


# -- kernels and cleanup ----------------------------------------------------------------------


@inlineCallbacks
def create_kernel(client, kernel_id, resources, kernel_ids):
    kernel_ids.append(kernel_id)  # before the call: a failed create may leave a container
    record = yield client.create_kernel(kernel_id, IMAGE, resources)
    if record["status"] != "running":
        raise RuntimeError(f"{kernel_id} is {record['status']!r} after CreateKernel")
    return record


@inlineCallbacks
def destroy_all(client, kernel_ids, concurrency):
    gate = DeferredSemaphore(concurrency)
    failures = []

    @inlineCallbacks
    def one(kernel_id):
        try:
            yield client.destroy_kernel(kernel_id)
        except Exception as e:
            failures.append(f"{kernel_id}: {e}")

    ids, kernel_ids[:] = list(kernel_ids), []
    yield gatherResults([gate.run(one, kernel_id) for kernel_id in ids], consumeErrors=True)
    for failure in failures:
        print(f"could not destroy {failure}", file=sys.stderr)


def remove_leftovers(agent_id):
    """Remove, with the Docker CLI, every container of this agent that is still there."""
    containers = agent_containers(agent_id, check=False)
    if containers:
        print(f"removing {len(containers)} leftover containers", file=sys.stderr)
        remove_containers(containers)


class Teardown:
    """
    Stops the watcher, the agent and etcd and removes every container, once: at the end of
    the run, or before the reactor shuts down (Ctrl-C, SIGTERM) when the run did not get
    there. Blocking, so that it completes even while the reactor is going away.
    """

    def __init__(self, bench, keep_log):
        self.bench = bench
        self.keep_log = keep_log
        self.watcher = None
        self.done = False
        self.interrupted = False

    def interrupt(self):
        """The reactor is shutting down before the run ended (Ctrl-C, SIGTERM)."""
        if not self.done:
            self.interrupted = True
            print("interrupted: cleaning up", file=sys.stderr)
        self()

    def __call__(self):
        if self.done:
            return
        self.done = True
        if self.watcher is not None:
            self.watcher.stop()
        agent = self.bench.agent
        if agent is not None:
            agent.stop()
            if self.keep_log:
                try:
                    shutil.copyfile(agent.log_path, self.keep_log)
                    print(f"agent log kept in {self.keep_log}", file=sys.stderr)
                except OSError as e:
                    print(f"could not keep the agent log: {e}", file=sys.stderr)
            try:
                remove_leftovers(agent.agent_id)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"could not remove leftover containers: {e}", file=sys.stderr)
        self.bench.stop()


# -- the run ----------------------------------------------------------------------------------


def status_heartbeat(bench):
    """``etcd.heartbeat_delay`` and ``etcd.heartbeat_delay_max`` of /status.json, or None."""
    code, body = bench.agent.http("/status.json")
    if code != 200:
        return None
    try:
        etcd = json.loads(body)["etcd"]
    except (ValueError, KeyError, TypeError):
        return None
    if "heartbeat_delay_max" not in etcd:
        return None
    return {"delay": etcd.get("heartbeat_delay"), "max": etcd.get("heartbeat_delay_max")}


@inlineCallbacks
def run(reactor, args, teardowns):
    extra = ["--heartbeat-interval", str(args.heartbeat_interval)]
    bench = BenchAgent(extra=extra, agent_id=f"bench-load-{os.getpid()}")
    teardown = Teardown(bench, args.agent_log)
    teardowns.append(teardown)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", teardown.interrupt)
    admin = None
    kernel_ids = []
    outcome = 1
    try:
        bench.start()
        process = psutil.Process(bench.agent.process.pid)
        rss_start = process.memory_info().rss
        teardown.watcher = watcher = HeartbeatWatcher(bench.etcd.url, f"/bai/bench/agents/{bench.agent_id}")
        watcher.start()
        admin = yield bench.connect(reactor)

        load = yield load_phase(reactor, bench, admin, args, kernel_ids, process, watcher)
        try:
            status_after_load = yield deferToThread(status_heartbeat, bench)
            idle = yield idle_phase(reactor, admin, args, kernel_ids, process, watcher)
        except Exception:
            print_load(args, load)  # what there is, before the failure's traceback
            raise
        status_after_idle = yield deferToThread(status_heartbeat, bench)

        outcome = report(args, load, idle, watcher, status_after_load, status_after_idle, rss_start)
    finally:
        if admin is not None:
            if kernel_ids:
                print(f"destroying {len(kernel_ids)} kernels", file=sys.stderr)
                yield destroy_all(admin, kernel_ids, args.create_batch)
            admin.close()
        reactor.removeSystemEventTrigger(trigger)
        teardown()
    if outcome:
        raise SystemExit(outcome)


def seconds(value):
    return f"{value:.3f} s" if isinstance(value, (int, float)) else repr(value)


def print_load(args, load):
    elapsed = load.ended - load.started
    count = len(load.latencies)
    print(
        f"\nLoad: {args.connections} connections, Execute {CODE!r} on {args.kernels} kernels "
        f"(cpu {LOAD_RESOURCES['cpu']}, mem {LOAD_RESOURCES['mem']}) for {elapsed:.1f} s"
    )
    print(f"  requests          {count} finished runs, {count / elapsed:.1f}/s")
    if count:
        print(
            f"  latency           p50 {statistics.median(load.latencies) * 1000:.2f} ms, "
            f"p99 {percentile(load.latencies, 0.99) * 1000:.2f} ms, max {max(load.latencies) * 1000:.2f} ms"
        )
    if load.agent_rss is not None:
        print(f"  agent             {load.agent_cpu:.0f} % of a core, RSS {load.agent_rss / 1e6:.1f} MB at the end")
    print(f"  this bench        {load.bench_cpu:.0f} % of a core (the managers' side)")
    if load.throttling is None:
        print("  kernels' CFS      no cgroup cpu.stat found")
    else:
        periods, throttled, throttled_seconds = load.throttling
        share = 100.0 * throttled / periods if periods else 0.0
        print(
            f"  kernels' CFS      throttled in {share:.0f} % of {periods} quota periods, "
            f"{throttled_seconds:.1f} s throttled in all (cpu {LOAD_RESOURCES['cpu']} each)"
        )
    if load.errors:
        print("  errors by kind    " + ", ".join(f"{kind} {n}" for kind, n in sorted(load.errors.items())))
        for line in load.first_errors:
            print(f"    {line}")


def report(args, load, idle, watcher, status_after_load, status_after_idle, rss_start):
    interval = args.heartbeat_interval
    misses = []

    def verdict(ok, name):
        if not ok:
            misses.append(name)
        return "PASS" if ok else "MISS"

    print_load(args, load)

    print(f"\nHeartbeat (interval {interval:g} s, lease TTL {watcher.granted_ttl} s), seen from etcd:")
    print("  delay = largest gap between two keep-alives - interval; lowest remaining TTL of the lease")
    worst = []
    for phase in ("load-setup", "load", "idle-setup", "idle"):
        gap, n = watcher.largest(phase)
        if gap is None:
            print(f"  {phase:12} no complete gap")
            continue
        worst.append(gap - interval)
        print(f"  {phase:12} {gap - interval:+6.2f} s over {n:3d} gaps, lowest TTL {watcher.lowest_ttl.get(phase)} s")
    print(
        f"  ({watcher.samples} samples every {SAMPLE_PERIOD:g} s, {watcher.sample_errors} failed; "
        "a gap is known to about one sample)"
    )
    for when, status in (("after load", status_after_load), ("at the end", status_after_idle)):
        if status is None:
            print(f"  /status.json {when}: no etcd.heartbeat_delay_max (not in this agent yet)")
        else:
            print(
                f"  /status.json {when}: heartbeat_delay {seconds(status['delay'])}, heartbeat_delay_max "
                f"{seconds(status['max'])} (the agent's own measure, since it started)"
            )
            if isinstance(status["max"], (int, float)):
                worst.append(float(status["max"]))
    heartbeat_delay = max(worst) if worst else None

    print(
        f"\nIdle: {args.idle_kernels} kernels (cpu {IDLE_RESOURCES['cpu']}, mem {IDLE_RESOURCES['mem']}), "
        f"created in {idle['create_seconds']:.1f} s, agent sampled for {idle['wall']:.1f} s"
    )
    print(
        f"  agent RSS         max {idle['rss_max'] / 1e6:.1f} MB, mean {idle['rss_mean'] / 1e6:.1f} MB "
        f"(at start, no kernels: {rss_start / 1e6:.1f} MB); {idle['threads']} threads, {idle['fds']} fds"
    )
    print(f"  agent CPU         {idle['cpu']:.2f} % of a core")

    errors = load.error_count
    print("\nTargets (2-core machine, shared with other work: timings are indicative)")
    print(f"  errors                    {errors:>10}        must be 0      {verdict(errors == 0, 'errors')}")
    if heartbeat_delay is None:
        print(f"  largest heartbeat delay   {'unknown':>10}        < {interval:g} s          MISS")
        misses.append("heartbeat")
    else:
        ok = heartbeat_delay < interval
        print(
            f"  largest heartbeat delay   {heartbeat_delay:>8.2f} s      < {interval:g} s          "
            f"{verdict(ok, 'heartbeat')}"
        )
    print(
        f"  idle agent RSS (max)      {idle['rss_max'] / 1e6:>7.1f} MB      < {RSS_TARGET / 1e6:.0f} MB       "
        f"{verdict(idle['rss_max'] < RSS_TARGET, 'rss')}"
    )
    print(
        f"  idle agent CPU            {idle['cpu']:>8.2f} %      < {CPU_TARGET:g} % core     "
        f"{verdict(idle['cpu'] < CPU_TARGET, 'cpu')}"
    )
    if errors:
        return 1
    return 2 if misses else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default %(default)s)")
    parser.add_argument("--connections", type=int, default=50, help="manager connections (default %(default)s)")
    parser.add_argument("--kernels", type=int, default=20, help="kernels under load (default %(default)s)")
    parser.add_argument(
        "--kernel-cpu",
        type=float,
        default=LOAD_RESOURCES["cpu"],
        help="cores of each kernel under load (default %(default)s)",
    )
    parser.add_argument("--idle-kernels", type=int, default=100, help="idle kernels (default %(default)s)")
    parser.add_argument("--idle-duration", type=float, help="seconds of idle sampling (default: --duration)")
    parser.add_argument("--settle", type=float, default=5, help="seconds between the last create and sampling")
    parser.add_argument("--heartbeat-interval", type=float, default=3, help="the agent's (default %(default)s)")
    parser.add_argument("--create-batch", type=int, default=10, help="kernels created at once (default %(default)s)")
    parser.add_argument("--agent-log", help="copy the agent's log here at the end")
    args = parser.parse_args()
    if args.idle_duration is None:
        args.idle_duration = args.duration
    if min(args.connections, args.kernels, args.idle_kernels, args.create_batch) < 1:
        parser.error("--connections, --kernels, --idle-kernels and --create-batch must be at least 1")
    if args.duration <= 0 or args.idle_duration <= 0 or args.settle < 0 or not 0.5 <= args.heartbeat_interval <= 300:
        parser.error("durations must be positive, --settle not negative, --heartbeat-interval 0.5 to 300")
    LOAD_RESOURCES["cpu"] = args.kernel_cpu
    teardowns = []
    try:
        react(run, [args, teardowns])
    except SystemExit:
        if any(teardown.interrupted for teardown in teardowns):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
