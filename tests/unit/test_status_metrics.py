"""
``/metrics`` from a state with kernels, statistics, GPUs, a journal and AMP commands: every
statistic as a Prometheus metric with ``kernel_id`` / ``device`` labels, and the agent's own.

``BusyAgent`` (a ``Harness`` with a real allocator and event journal, fake kernels and a
fake statistics collector) is shared with test_status_page.py.
"""

import math
import os

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from bai_agent.kernels.allocator import ResourceRequest
from bai_agent.kernels.journal import EventJournal
from bai_agent.node.capacity import Capacity
from bai_agent.node.gpus import GpuDevice
from bai_agent.status.history import StatsHistory
from tests.agent_parts import FakeKernels as BaseFakeKernels
from tests.agent_parts import StubEtcd
from tests.unit.test_rpc_server import Harness

NOW = 1_700_000_000.0
GIB = 1 << 30


@attrs.define
class LateEtcd(StubEtcd):
    """The etcd service's heartbeat timing as the status page reads it."""

    heartbeat_delay: float = 0.0
    heartbeat_delay_max: float = 0.0


class FakeStats:
    """The StatsCollector's reading side: ``latest_all``, ``latest``, ``node_latest``, ``sample_seconds``."""

    def __init__(self):
        self.kernels = {}
        self.node = None
        self.sample_seconds = 0.0

    def latest_all(self):
        return dict(self.kernels)

    def latest(self, kernel_id):
        return self.kernels.get(kernel_id)

    def node_latest(self):
        return self.node


class FakeKernels(BaseFakeKernels):
    """The registry's reading side, over a real allocator, with ``add``."""

    def add(self, kernel_id, image, cpu, mem, gpus=0, created_at=NOW, last_used=NOW, status="running"):
        grant = self.allocator.allocate(kernel_id, ResourceRequest(cpu=cpu, mem=mem, cuda_devices=gpus))
        self.kernels[kernel_id] = {
            "kernel_id": kernel_id,
            "image": image,
            "status": status,
            "container_id": "c-" + kernel_id,
            "created_at": created_at,
            "last_used": last_used,
            "resources": grant.to_json(),
            "idle_timeout": 0,
            "exec_timeout": 0,
        }


def kernel_sample(cpu_used_ms=0, cpu_util=0.0, mem_bytes=0, **fields):
    sample = {
        "cpu_used_ms": cpu_used_ms,
        "cpu_util": cpu_util,
        "mem_bytes": mem_bytes,
        "mem_max_bytes": mem_bytes,
        "io_read_bytes": 0,
        "io_write_bytes": 0,
        "net_rx_bytes": 0,
        "net_tx_bytes": 0,
        "pids": 1,
        "scratch_bytes": 0,
        "sampled_at": NOW,
    }
    sample.update(fields)
    return sample


def node_sample(gpus=()):
    return {
        "sampled_at": NOW,
        "cpu": {"count": 4, "percent": 62.5, "per_core": [100.0, 50.0, 0.0, 100.0]},
        "mem": {"total": 16 * GIB, "used": 6 * GIB, "available": 10 * GIB},
        "disk": {"path": "/var/lib/bai/scratch", "total": 100 * GIB, "used": 25 * GIB, "free": 75 * GIB},
        "net": {"rx_bytes": 123456789, "tx_bytes": 98765},
        "gpus": list(gpus),
    }


def busy_history():
    """
    An hour of rounds every 5 s until NOW: the machine's CPU in waves with two minutes
    unsampled, its memory climbing, k-train working harder and growing, k-idle (10 minutes
    old) nearly idle.
    """
    history = StatsHistory(5.0)
    for step in range(721):
        at = NOW - 3600 + 5 * step
        cpu = None if 300 <= step < 324 else round(45 + 30 * math.sin(step / 40) + (step % 7), 1)
        if step == 720:
            cpu = 62.5  # the node's last sample, as the page's resources show it
        node = node_sample()
        node["sampled_at"] = at
        node["cpu"]["percent"] = cpu
        node["mem"]["used"] = 4 * GIB + step * (2 * GIB // 720)
        node["disk"]["used"] = 20 * GIB + step * (5 * GIB // 720)
        kernels = {
            "k-train": kernel_sample(
                cpu_util=round(60 + 90 * step / 720, 1), mem_bytes=GIB + step * (2 * GIB // 720), sampled_at=at
            )
        }
        if step >= 600:
            kernels["k-idle"] = kernel_sample(cpu_util=float(step % 3), mem_bytes=20 << 20, sampled_at=at)
        history.record(node, kernels)
    return history


class BusyAgent(Harness):
    """
    Two GPUs, two kernels (``k-train`` holds GPU 0, ``k-idle`` none), statistics for both
    and for the machine (GPU 1 fails in NVML), a journal with three events, two AMP
    commands observed (one failed), and an etcd heartbeat that ran late.
    """

    def __init__(self, tmp_path, history=None):
        clock_at = NOW
        gpus = [GpuDevice(0, "GPU-aaaa", "NVIDIA H100", 80 * GIB), GpuDevice(1, "GPU-bbbb", "NVIDIA H100", 80 * GIB)]
        kernels = FakeKernels(Capacity(4.0, 12 * GIB, 2), gpus, cpu_cores=[0, 1, 2, 3])
        kernels.add("k-train", "bai-kernel/python:3.11", 2, 4 * GIB, gpus=1, created_at=NOW - 7200, last_used=NOW - 5)
        kernels.add("k-idle", "bai-kernel/python:3.11", 0.5, 512 << 20, created_at=NOW - 600, last_used=NOW - 540)
        kernels.pool = {
            "images": {"bai-kernel/python:3.11": {"target": 3, "ready": 2, "filling": 1}},
            "problem": None,
            "claims": 7,
            "misses": 1,
            "filled": 9,
            "failures": 0,
            "last_refill_seconds": 0.2345,
        }
        kernels.pulls = [
            {
                "image": "reg.example:5000/team/python:3.12",
                "bytes_done": 12 << 20,
                "bytes_total": 48 << 20,
                "waiting": 2,
                "elapsed": 7.5,
            }
        ]
        kernels.kernels["k-train"]["services"] = [
            {
                "name": "jupyter",
                "protocol": "http",
                "container_port": 8888,
                "status": "running",
                "host": "10.0.0.5",
                "port": 30001,
                "url": "http://10.0.0.5:30001/?token=HIDDEN",
            },
            {
                "name": "ssh",
                "protocol": "tcp",
                "container_port": 2200,
                "status": "running",
                "host": "10.0.0.5",
                "port": 30002,
                "url": None,
            },
            {
                "name": "tensorboard",
                "protocol": "http",
                "container_port": 6006,
                "status": "starting",
                "host": None,
                "port": None,
                "url": None,
            },
        ]
        kernels.relayed.update(
            connections=31, refused=2, idle_closed=3, bytes_to_service=4096, bytes_to_client=64 << 20, running=1
        )
        stats = FakeStats()
        stats.sample_seconds = 0.0042
        stats.kernels = {
            "k-train": kernel_sample(
                cpu_used_ms=7_250_500,
                cpu_util=150.0,
                mem_bytes=3 * GIB,
                mem_max_bytes=3 * GIB + 5,
                io_read_bytes=1000,
                io_write_bytes=2000,
                net_rx_bytes=300,
                net_tx_bytes=400,
                pids=12,
                scratch_bytes=5 << 20,
            ),
            "k-idle": kernel_sample(cpu_used_ms=1200, cpu_util=0.0, mem_bytes=20 << 20),
        }
        stats.node = node_sample(
            gpus=[
                {
                    "index": 0,
                    "uuid": "GPU-aaaa",
                    "name": "NVIDIA H100",
                    "util_percent": 87,
                    "mem_used": 40 * GIB,
                    "mem_total": 80 * GIB,
                },
                {"index": 1, "uuid": "GPU-bbbb", "name": "NVIDIA H100", "error": "GPU is lost"},
            ]
        )
        clock = Clock()
        clock.advance(clock_at)
        journal = EventJournal(str(tmp_path / "events.jsonl"), clock, fsync=False)
        journal.open()
        journal.append("agent-started")
        journal.append("kernel-started", "k-train")
        journal.append("kernel-started", "k-idle")
        etcd = LateEtcd(last_heartbeat_at=NOW - 1, heartbeat_delay=0.25, heartbeat_delay_max=1.5)
        super().__init__(
            tmp_path,
            clock=clock,
            kernels=kernels,
            stats=stats,
            journal=journal,
            etcd=etcd,
            history=history if history is not None else busy_history(),
        )
        self.state.report.started_at = NOW - 3600
        self.state.metrics.observe_command("CreateKernel", 0.8)
        self.state.metrics.observe_command("Execute", 0.002, b"KERNEL_NOT_FOUND")

    def close(self):
        self.state.journal.close()


@pytest.fixture
def busy(tmp_path):
    agent = BusyAgent(tmp_path)
    yield agent
    agent.close()


def statistics_families(metrics):
    return [
        name
        for name in metrics
        if name.startswith(("bai_agent_kernel_", "bai_agent_node_", "bai_agent_gpu"))
        and name != "bai_agent_kernel_images"
    ]


def families(state):
    return {family.name: family for family in text_string_to_metric_families(state.metrics.render().decode())}


def by_label(family, label, suffix=""):
    return {sample.labels[label]: sample.value for sample in family.samples if sample.name == family.name + suffix}


def test_kernel_statistics_are_metrics_by_kernel_id(busy):
    metrics = families(busy.state)
    cpu = metrics["bai_agent_kernel_cpu_seconds"]
    assert cpu.type == "counter"
    assert by_label(cpu, "kernel_id", "_total") == {"k-train": 7250.5, "k-idle": 1.2}
    assert by_label(metrics["bai_agent_kernel_cpu_usage_ratio"], "kernel_id") == {"k-train": 1.5, "k-idle": 0.0}
    assert by_label(metrics["bai_agent_kernel_memory_bytes"], "kernel_id")["k-train"] == 3 * GIB
    assert by_label(metrics["bai_agent_kernel_memory_peak_bytes"], "kernel_id")["k-train"] == 3 * GIB + 5
    for name, value in (
        ("bai_agent_kernel_io_read_bytes", 1000),
        ("bai_agent_kernel_io_write_bytes", 2000),
        ("bai_agent_kernel_network_receive_bytes", 300),
        ("bai_agent_kernel_network_transmit_bytes", 400),
    ):
        assert metrics[name].type == "counter", name
        assert by_label(metrics[name], "kernel_id", "_total")["k-train"] == value, name
    assert by_label(metrics["bai_agent_kernel_pids"], "kernel_id") == {"k-train": 12, "k-idle": 1}
    assert by_label(metrics["bai_agent_kernel_scratch_bytes"], "kernel_id")["k-train"] == 5 << 20


def test_kernel_records_give_identity_grants_and_times(busy):
    metrics = families(busy.state)
    info = {sample.labels["kernel_id"]: sample.labels for sample in metrics["bai_agent_kernel_info"].samples}
    assert info["k-train"]["image"] == "bai-kernel/python:3.11"
    assert info["k-idle"]["status"] == "running"
    assert by_label(metrics["bai_agent_kernel_cpu_granted_cores"], "kernel_id") == {"k-train": 2.0, "k-idle": 0.5}
    assert by_label(metrics["bai_agent_kernel_memory_granted_bytes"], "kernel_id")["k-idle"] == 512 << 20
    assert by_label(metrics["bai_agent_kernel_last_used_timestamp_seconds"], "kernel_id")["k-idle"] == NOW - 540
    assert by_label(metrics["bai_agent_kernel_created_timestamp_seconds"], "kernel_id")["k-train"] == NOW - 7200


def test_node_statistics_are_metrics(busy):
    metrics = families(busy.state)
    assert metrics["bai_agent_node_cpus"].samples[0].value == 4
    assert metrics["bai_agent_node_cpu_usage_ratio"].samples[0].value == 0.625
    per_core = by_label(metrics["bai_agent_node_cpu_core_usage_ratio"], "core")
    assert per_core == {"0": 1.0, "1": 0.5, "2": 0.0, "3": 1.0}
    assert metrics["bai_agent_node_memory_total_bytes"].samples[0].value == 16 * GIB
    assert metrics["bai_agent_node_memory_used_bytes"].samples[0].value == 6 * GIB
    assert metrics["bai_agent_node_memory_available_bytes"].samples[0].value == 10 * GIB
    free = metrics["bai_agent_node_scratch_disk_free_bytes"].samples[0]
    assert free.value == 75 * GIB and free.labels == {"path": "/var/lib/bai/scratch"}
    assert metrics["bai_agent_node_scratch_disk_total_bytes"].samples[0].value == 100 * GIB
    assert metrics["bai_agent_node_scratch_disk_used_bytes"].samples[0].value == 25 * GIB
    assert metrics["bai_agent_node_network_receive_bytes"].type == "counter"
    assert metrics["bai_agent_node_network_receive_bytes"].samples[0].value == 123456789
    assert metrics["bai_agent_node_network_transmit_bytes"].samples[0].value == 98765


def test_gpu_statistics_are_metrics_by_device(busy):
    metrics = families(busy.state)
    info = {sample.labels["device"]: sample.labels for sample in metrics["bai_agent_gpu_info"].samples}
    assert info["0"]["uuid"] == "GPU-aaaa" and info["0"]["name"] == "NVIDIA H100"
    assert info["1"]["uuid"] == "GPU-bbbb"
    assert by_label(metrics["bai_agent_gpu_up"], "device") == {"0": 1, "1": 0}
    assert by_label(metrics["bai_agent_gpu_granted"], "device") == {"0": 1, "1": 0}
    # A device NVML failed on has no readings rather than zeros.
    assert by_label(metrics["bai_agent_gpu_utilization_ratio"], "device") == {"0": 0.87}
    assert by_label(metrics["bai_agent_gpu_memory_used_bytes"], "device") == {"0": 40 * GIB}
    assert by_label(metrics["bai_agent_gpu_memory_total_bytes"], "device") == {"0": 80 * GIB}


def test_agent_metrics_journal_heartbeat_and_sampling(busy):
    metrics = families(busy.state)
    assert metrics["bai_agent_events_journal_entries"].samples[0].value == 3
    assert metrics["bai_agent_events_last_seq"].samples[0].value == 3
    assert metrics["bai_agent_heartbeat_delay_seconds"].samples[0].value == 0.25
    assert metrics["bai_agent_heartbeat_delay_max_seconds"].samples[0].value == 1.5
    assert metrics["bai_agent_heartbeat_last_timestamp_seconds"].samples[0].value == NOW - 1
    assert metrics["bai_agent_stats_sample_seconds"].samples[0].value == 0.0042
    assert metrics["bai_agent_kernels"].samples[0].value == 2
    used = by_label(metrics["bai_agent_resource_used"], "slot")
    assert used == {"cpu": 2.5, "mem": float(4 * GIB + (512 << 20)), "cuda.device": 1.0}


def test_service_relays_are_counted(busy):
    metrics = families(busy.state)
    assert metrics["bai_agent_services_running"].samples[0].value == 1
    outcomes = by_label(metrics["bai_agent_service_relay_connections"], "outcome", "_total")
    assert outcomes == {"relayed": 31, "refused": 2, "failed": 0}
    assert metrics["bai_agent_service_relay_idle_closed"].samples[0].value == 3
    assert metrics["bai_agent_image_pulls"].samples[0].value == 1
    assert by_label(metrics["bai_agent_warm_pool_ready"], "image") == {"bai-kernel/python:3.11": 2}
    assert by_label(metrics["bai_agent_warm_pool_size"], "image") == {"bai-kernel/python:3.11": 3}
    assert metrics["bai_agent_warm_pool_claims"].samples[0].value == 7
    assert metrics["bai_agent_warm_pool_misses"].samples[0].value == 1
    directions = by_label(metrics["bai_agent_service_relay_bytes"], "direction", "_total")
    assert directions == {"to_service": 4096, "to_client": 64 << 20}


def test_command_latency_and_errors_keep_their_names(busy):
    metrics = families(busy.state)
    latency = metrics["bai_agent_amp_command_seconds"]
    assert latency.type == "histogram"
    assert by_label(latency, "command", "_count") == {"CreateKernel": 1.0, "Execute": 1.0}
    errors = metrics["bai_agent_amp_command_errors"]
    assert errors.type == "counter"
    assert [(s.labels, s.value) for s in errors.samples if s.name.endswith("_total")] == [
        ({"command": "Execute", "code": "KERNEL_NOT_FOUND"}, 1.0)
    ]


def test_a_just_started_agent_has_no_statistics_metrics_and_no_errors(tmp_path):
    agent = Harness(tmp_path)
    metrics = families(agent.state)
    assert statistics_families(metrics) == []
    assert metrics["bai_agent_heartbeat_delay_seconds"].samples[0].value == 0.0
    assert metrics["bai_agent_events_journal_entries"].samples[0].value == 0
    assert "bai_agent_stats_sample_seconds" not in metrics
    # A collector that has not sampled yet answers None / {}.
    agent.state.stats = FakeStats()
    metrics = families(agent.state)
    assert statistics_families(metrics) == []


def test_odd_readings_are_left_out_not_fatal(busy):
    stats = busy.state.stats
    stats.kernels["k-idle"] = kernel_sample(cpu_util=math.nan, mem_bytes="lots", pids=True)
    stats.kernels[7] = kernel_sample()
    stats.node["cpu"]["per_core"] = [10.0, None, math.inf, 30.0]
    stats.node["mem"] = {"total": "lots", "used": None, "available": math.nan}
    metrics = families(busy.state)
    assert by_label(metrics["bai_agent_kernel_cpu_usage_ratio"], "kernel_id") == {"k-train": 1.5}
    assert "k-idle" not in by_label(metrics["bai_agent_kernel_memory_bytes"], "kernel_id")
    assert "k-idle" not in by_label(metrics["bai_agent_kernel_pids"], "kernel_id")
    assert by_label(metrics["bai_agent_node_cpu_core_usage_ratio"], "core") == {"0": 0.1, "3": 0.3}
    assert "bai_agent_node_memory_total_bytes" not in metrics


def test_names_follow_prometheus_conventions(busy):
    metrics = families(busy.state)
    for name, family in metrics.items():
        assert family.documentation, name
        if family.type == "counter":
            assert all(sample.name.endswith("_total") for sample in family.samples), name
        else:
            assert not name.endswith("_total"), name
        assert "percent" not in name and "milli" not in name, name


def test_kernels_terminated_are_counted_by_reason_from_zero(busy):
    metrics = families(busy.state)
    terminated = by_label(metrics["bai_agent_kernels_terminated"], "reason", "_total")
    assert terminated["oom-killed"] == 0 and terminated["user-requested"] == 0
    busy.state.journal.append("kernel-terminated", "k-idle", {"reason": "oom-killed", "exit_code": 137})
    busy.state.journal.append("kernel-terminated", "k-train", {"reason": "oom-killed", "exit_code": 137})
    busy.state.journal.append("kernel-terminated", "k-x", {"reason": "user-requested", "exit_code": 0})
    busy.state.journal.append("kernel-started", "k-y")
    terminated = by_label(families(busy.state)["bai_agent_kernels_terminated"], "reason", "_total")
    assert terminated["oom-killed"] == 2 and terminated["user-requested"] == 1 and terminated["idle-timeout"] == 0


def test_heartbeat_interval_and_journal_file_size_are_metrics(busy):
    metrics = families(busy.state)
    assert metrics["bai_agent_heartbeat_interval_seconds"].samples[0].value == 3.0
    size = os.path.getsize(busy.state.journal.path)
    assert size > 0
    assert metrics["bai_agent_events_journal_file_bytes"].samples[0].value == size
