"""
StatsCollector on a task.Clock with a synchronous run_blocking, reading a fake cgroup v2
tree through the real CgroupReader, fake psutil and FakeNvml.
"""

import os
import shutil

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from bai_agent.node.gpus import discover_gpus
from bai_agent.stats.cgroups import CgroupReader
from bai_agent.stats.collector import SAMPLE_KEYS, KernelTarget, StatsCollector
from bai_agent.stats.gpu import GpuStats
from bai_agent.stats.node import NodeStats
from bai_agent.stats.scratch import ScratchSizer
from bai_agent.testing.fake_nvml import FakeNvml, fake_gpus
from tests.unit.test_stats_cgroups import NET_DEV, proc_with, v2_tree, write
from tests.unit.test_stats_node import FakePsutil

A = "a1" * 32
B = "b2" * 32
MIB = 1 << 20


def run_now(f, *args):
    """A synchronous run_blocking: runs ``f`` at once, on this thread."""
    try:
        return succeed(f(*args))
    except Exception as error:
        return fail(error)


class HeldRunBlocking:
    """A run_blocking whose calls finish only when the test says so."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, index=-1):
        f, args, d = self.calls[index]
        d.callback(f(*args))


class Machine:
    """A fake cgroup v2 root and /proc with containers A and B, and their homes."""

    def __init__(self, tmp_path):
        self.root = str(tmp_path / "cgroup")
        self.proc = str(tmp_path / "proc")
        self.homes = tmp_path / "homes"
        self.groups = {}
        for pid, container in ((42, A), (43, B)):
            self.groups[container] = v2_tree(
                self.root, f"docker/{container}", usage_usec=1_000_000, peak=None, procs=f"{pid}\n"
            )
            proc_with(self.proc, pid, NET_DEV)
            (self.homes / container).mkdir(parents=True)
        self.reader = CgroupReader(self.root, version=2, proc=self.proc)
        self.targets = [KernelTarget("ka", A, str(self.homes / A)), KernelTarget("kb", B, str(self.homes / B))]

    def set(self, container, **values):
        group = self.groups[container]
        if "usage_usec" in values:
            write(os.path.join(group, "cpu.stat"), f"usage_usec {values['usage_usec']}\nuser_usec 0\nsystem_usec 0\n")
        if "mem" in values:
            write(os.path.join(group, "memory.current"), f"{values['mem']}\n")

    def remove(self, container):
        shutil.rmtree(self.groups[container])


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


def collector_for(machine, clock=None, run_blocking=run_now, **kwargs):
    clock = clock or Clock()
    clock.advance(1000)
    return StatsCollector(clock, machine.reader, lambda: list(machine.targets), run_blocking, **kwargs), clock


def messages(events, minimum=LogLevel.warn):
    return [formatEvent(event) for event in events if event["log_level"] >= minimum]


def test_starting_samples_every_kernel_at_once(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    sample = collector.latest("ka")
    assert tuple(sample) == SAMPLE_KEYS
    assert sample == {
        "cpu_used_ms": 1000,
        "cpu_util": 0.0,  # nothing to compare with yet
        "mem_bytes": 150 * MIB,
        "mem_max_bytes": 150 * MIB,
        "io_read_bytes": 1048576 + 10,
        "io_write_bytes": 4096 + 20,
        "net_rx_bytes": 1234,
        "net_tx_bytes": 866,
        "pids": 3,
        "scratch_bytes": os.lstat(machine.homes / A).st_blocks * 512,
        "sampled_at": 1000.0,
    }
    assert set(collector.latest_all()) == {"ka", "kb"}
    collector.stopService()


def test_cpu_util_is_percent_of_one_core_since_the_previous_sample(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    machine.set(A, usage_usec=1_000_000 + 10_000_000)  # 10 s of CPU in 5 s: two busy cores
    machine.set(B, usage_usec=1_000_000 + 1_250_000)
    clock.advance(5)
    assert collector.latest("ka")["cpu_util"] == 200.0
    assert collector.latest("kb")["cpu_util"] == 25.0
    assert collector.latest("ka")["cpu_used_ms"] == 11000
    assert collector.latest("ka")["sampled_at"] == 1005.0
    collector.stopService()


def test_rounds_come_every_interval(machine):
    collector, clock = collector_for(machine, interval=5.0)
    collector.startService()
    assert collector.rounds == 1
    clock.advance(4.9)
    assert collector.rounds == 1
    clock.advance(0.1)
    assert collector.rounds == 2
    clock.advance(50)
    assert collector.rounds == 3  # a late loop skips what it missed instead of bursting
    collector.stopService()


def test_the_peak_is_the_largest_seen_without_memory_peak(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    machine.set(A, mem=400 * MIB)
    clock.advance(5)
    machine.set(A, mem=50 * MIB)
    clock.advance(5)
    assert (collector.latest("ka")["mem_bytes"], collector.latest("ka")["mem_max_bytes"]) == (50 * MIB, 400 * MIB)
    collector.stopService()


def test_scratch_bytes_follow_the_home(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    before = collector.latest("ka")["scratch_bytes"]
    with open(machine.homes / A / "data", "wb") as f:
        f.write(b"x" * (3 * MIB))
        f.flush()
        os.fsync(f.fileno())
    clock.advance(5)
    assert collector.latest("ka")["scratch_bytes"] >= before + 3 * MIB
    assert collector.latest("kb")["scratch_bytes"] == before
    collector.stopService()


def test_a_big_home_is_sized_over_several_rounds(machine):
    for i in range(350):  # 100 entries a round: complete in the fourth
        (machine.homes / A / f"f{i}").write_bytes(b"x" * 5000)
    collector, clock = collector_for(machine, sizer_factory=lambda path: ScratchSizer(path, max_entries=100))
    collector.startService()
    sizes = [collector.latest("ka")["scratch_bytes"]]
    for _ in range(4):
        clock.advance(5)
        sizes.append(collector.latest("ka")["scratch_bytes"])
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3] == sizes[4]
    collector.stopService()


def test_node_statistics_with_gpus(machine):
    nvml = FakeNvml(fake_gpus(2))
    nvml.update_gpu(1, gpu_utilization=40)
    gpus = GpuStats(nvml, discover_gpus(nvml))
    collector, clock = collector_for(machine, node=NodeStats("/srv/scratch", psutil_module=FakePsutil()), gpus=gpus)
    collector.startService()
    node = collector.node_latest()
    assert set(node) == {"sampled_at", "cpu", "mem", "disk", "net", "gpus"}
    assert node["sampled_at"] == 1000.0
    assert node["cpu"]["per_core"] == [100.0, 50.0, 10.0, 0.0]
    assert node["disk"]["path"] == "/srv/scratch"
    assert [(gpu["index"], gpu["util_percent"]) for gpu in node["gpus"]] == [(0, 0.0), (1, 40.0)]
    clock.advance(15)
    assert nvml.init_calls == 2  # discovery's, and the collector's one for its lifetime
    collector.stopService()
    assert not nvml.initialised


def test_node_statistics_without_nvml_have_no_gpus(machine):
    devices = discover_gpus(FakeNvml(fake_gpus(1)))
    gpus = GpuStats(FakeNvml.driver_not_loaded(), devices)
    collector, clock = collector_for(machine, node=NodeStats("/srv", psutil_module=FakePsutil()), gpus=gpus)
    with capturedLogs() as events:
        collector.startService()
        clock.advance(5)
    assert collector.node_latest()["gpus"] == []
    said = [m for m in messages(events) if "NVML did not initialise" in m]
    assert len(said) == 1 and "DriverNotLoaded" in said[0]
    collector.stopService()


def test_without_node_or_gpus_there_is_no_node_sample(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    assert collector.node_latest() is None
    collector.stopService()


def test_rounds_never_overlap(machine):
    held = HeldRunBlocking()
    collector, clock = collector_for(machine, run_blocking=held)
    collector.startService()
    assert len(held.calls) == 1
    clock.advance(5)
    clock.advance(5)
    manual = collector.sample()  # waits for the round in flight instead of starting one
    assert len(held.calls) == 1 and not manual.called
    held.finish()
    assert manual.called and collector.rounds == 1
    clock.advance(5)
    assert len(held.calls) == 2
    held.finish()
    collector.stopService()


def test_a_tick_during_a_manual_round_is_skipped(machine):
    held = HeldRunBlocking()
    collector, clock = collector_for(machine, run_blocking=held, interval=5)
    collector.startService()
    held.finish()
    clock.advance(3)
    collector.sample()
    clock.advance(2)  # the loop's tick comes while the manual round runs
    assert len(held.calls) == 2
    held.finish()
    clock.advance(5)
    assert len(held.calls) == 3
    held.finish()
    collector.stopService()


def test_stopping_waits_for_the_round_in_flight_and_stops_the_loop(machine):
    held = HeldRunBlocking()
    nvml = FakeNvml(fake_gpus(1))
    collector, clock = collector_for(machine, run_blocking=held, gpus=GpuStats(nvml, discover_gpus(nvml)))
    collector.startService()
    stopped = collector.stopService()
    assert not stopped.called
    held.finish()
    assert stopped.called
    assert not nvml.initialised  # closed after the round that used it
    clock.advance(60)
    assert len(held.calls) == 1
    assert not clock.getDelayedCalls()


def test_one_failing_kernel_leaves_the_others_and_is_logged_once(machine):
    class Flaky:
        def __init__(self, reader):
            self.reader = reader

        def read(self, container_id):
            if container_id == B:
                raise PermissionError("no")
            return self.reader.read(container_id)

    collector = StatsCollector(Clock(), Flaky(machine.reader), lambda: machine.targets, run_now)
    with capturedLogs() as events:
        collector.startService()
        collector._clock.advance(5)
        collector._clock.advance(5)
    assert collector.latest("ka") is not None and collector.latest("kb") is None
    assert len([m for m in messages(events) if "kernel kb" in m and "PermissionError" in m]) == 1
    assert collector.rounds == 3
    collector.stopService()


def test_junk_in_a_cgroup_file_is_logged_once(machine):
    write(os.path.join(machine.groups[A], "memory.current"), "junk\n")
    collector, clock = collector_for(machine)
    with capturedLogs() as events:
        collector.startService()
        clock.advance(5)
    junk = [m for m in messages(events) if "not a number" in m]
    assert len(junk) == 1 and A in junk[0]
    assert collector.latest("ka")["mem_bytes"] == 0
    collector.stopService()


def test_a_failing_kernel_list_or_thread_never_fails_a_round(machine):
    def broken():
        raise RuntimeError("registry in trouble")

    node = NodeStats("/srv", psutil_module=FakePsutil())
    collector = StatsCollector(Clock(), machine.reader, broken, run_now, node=node)
    with capturedLogs() as events:
        collector.startService()
    assert collector.node_latest() is not None and collector.latest_all() == {}
    assert any("could not list the kernels" in m for m in messages(events, LogLevel.critical))
    collector.stopService()

    def no_threads(f, *args):
        return fail(RuntimeError("thread pool stopped"))

    collector = StatsCollector(Clock(), machine.reader, lambda: machine.targets, no_threads)
    results = []
    with capturedLogs() as events:
        collector.sample().addBoth(results.append)
    assert results == [None]
    assert any("round failed" in m for m in messages(events, LogLevel.critical))


def test_targets_without_a_container_are_skipped(machine):
    machine.targets.append(KernelTarget("creating", None, None))
    collector, clock = collector_for(machine)
    collector.startService()
    assert set(collector.latest_all()) == {"ka", "kb"}
    collector.stopService()


def test_a_gone_container_keeps_its_latest_sample(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    first = collector.latest("ka")
    machine.remove(A)
    clock.advance(5)
    assert collector.latest("ka") == first
    collector.stopService()


def test_forget_drops_a_kernel(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    machine.targets.pop(0)
    collector.forget("ka")
    collector.forget("never-known")
    assert collector.latest("ka") is None and set(collector.latest_all()) == {"kb"}
    clock.advance(5)
    assert collector.latest("ka") is None
    collector.stopService()


def test_sample_kernel_reads_now(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    machine.set(A, usage_usec=3_000_000)
    clock.advance(2)  # between two rounds
    results = []
    collector.sample_kernel(machine.targets[0]).addCallback(results.append)
    [sample] = results
    assert sample["cpu_used_ms"] == 3000 and sample["sampled_at"] == 1002.0
    assert sample["cpu_util"] == 100.0  # 2 s of CPU in 2 s
    assert collector.latest("ka") == sample
    collector.stopService()


def test_sample_kernel_of_a_gone_cgroup_is_the_latest_sample(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    latest = collector.latest("ka")
    machine.remove(A)
    results = []
    collector.sample_kernel(machine.targets[0]).addCallback(results.append)
    assert results == [latest]
    collector.stopService()


def test_sample_kernel_of_a_kernel_never_sampled_is_zeros(machine):
    collector, clock = collector_for(machine)
    machine.remove(B)
    results = []
    collector.sample_kernel(machine.targets[1]).addCallback(results.append)
    [sample] = results
    assert tuple(sample) == SAMPLE_KEYS
    assert all(sample[key] == 0 for key in SAMPLE_KEYS if key != "sampled_at")


def test_sample_kernel_never_fails(machine):
    collector = StatsCollector(Clock(), machine.reader, lambda: [], lambda f, *a: fail(RuntimeError("no threads")))
    results = []
    with capturedLogs():
        collector.sample_kernel(machine.targets[0]).addBoth(results.append)
    assert isinstance(results[0], dict) and results[0]["cpu_used_ms"] == 0


def test_a_new_container_for_a_kernel_starts_a_new_baseline(machine):
    collector, clock = collector_for(machine)
    collector.startService()
    machine.targets[0] = KernelTarget("ka", B, str(machine.homes / A))  # restarted as B
    clock.advance(5)
    assert collector.latest("ka")["cpu_util"] == 0.0
    collector.stopService()


def test_sample_seconds_is_the_rounds_cpu_time(machine):
    collector, clock = collector_for(machine)
    collector.sample()
    assert isinstance(collector.sample_seconds, float) and collector.sample_seconds > 0


def test_a_nonsense_interval_is_refused(machine):
    with pytest.raises(ValueError):
        StatsCollector(Clock(), machine.reader, list, run_now, interval=0)


def test_sample_kernel_without_a_container_is_what_there_is(machine):
    collector, clock = collector_for(machine)
    results = []
    collector.sample_kernel(KernelTarget("never-created", None, None)).addCallback(results.append)
    assert results[0]["cpu_used_ms"] == 0 and tuple(results[0]) == SAMPLE_KEYS
    collector.startService()
    latest = collector.latest("ka")
    collector.sample_kernel(KernelTarget("ka", None, None)).addCallback(results.append)
    assert results[1] == latest
    collector.stopService()


def test_round_listeners_hear_of_each_round_after_its_samples_are_stored(machine):
    collector, clock = collector_for(machine)
    heard = []
    collector.add_round_listener(lambda: heard.append(collector.latest("ka")["sampled_at"]))
    collector.startService()
    clock.advance(5)
    assert heard == [1000.0, 1005.0]
    collector.stopService()


def test_a_failing_round_listener_is_logged_and_the_rounds_go_on(machine):
    collector, clock = collector_for(machine)
    heard = []

    def broken():
        raise RuntimeError("listener broke")

    collector.add_round_listener(broken)
    collector.add_round_listener(lambda: heard.append(collector.rounds))
    with capturedLogs() as events:
        collector.startService()
        clock.advance(5)
    assert heard == [1, 2]
    assert any("round listener" in message for message in messages(events, LogLevel.critical))
    collector.stopService()
