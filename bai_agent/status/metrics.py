"""
Prometheus metrics of one agent, in a registry of its own (never the global one, so that
several agents in one process, as in tests, do not collide).

The agent's own work (AMP command latency and errors) is counted as it happens; everything
else is read from the ``StatusSources`` at scrape time: health, allocation, the statistics of each
kernel (label ``kernel_id``), of the machine and of each NVIDIA device (label ``device``, the
NVML index), the event journal and the etcd heartbeat's delay. Names follow Prometheus
conventions: base units (seconds, bytes), shares as ``_ratio`` (0..1; a kernel's CPU ratio
counts cores, so 2.0 is two cores busy), ``_total`` only on counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from bai_agent.protocol.events import KERNEL_TERMINATED, TERMINATION_REASONS
from bai_agent.stats import readings as stats_readings
from bai_agent.status import readings

if TYPE_CHECKING:
    from bai_agent.kernels.journal import AgentEvent
    from bai_agent.status.sources import StatusSources

COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    """Counters the agent updates as it works, plus gauges read from the ``StatusSources`` at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.command_seconds = Histogram(
            "bai_agent_amp_command_seconds",
            "Time to answer an AMP command, by command",
            ["command"],
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self.command_errors = Counter(
            "bai_agent_amp_command_errors",
            "AMP commands answered with an error, by command and error code",
            ["command", "code"],
            registry=self.registry,
        )
        self.kernels_terminated = Counter(
            "bai_agent_kernels_terminated",
            "Kernels that ended since the agent started, by the reason of their kernel-terminated event "
            "(oom-killed: the kernel hit its memory limit)",
            ["reason"],
            registry=self.registry,
        )
        for reason in TERMINATION_REASONS:  # every reason from 0, so that increase() sees the first one
            self.kernels_terminated.labels(reason)

    def observe_event(self, event: AgentEvent) -> None:
        """Count what the event journal records (an ``EventJournal`` listener)."""
        if event.type == KERNEL_TERMINATED:
            self.kernels_terminated.labels(str(event.data.get("reason"))).inc()

    def observe_command(self, command: str, seconds: float, error_code: bytes | str | None = None) -> None:
        self.command_seconds.labels(command).observe(seconds)
        if error_code is not None:
            code = error_code.decode("ascii", "replace") if isinstance(error_code, bytes) else str(error_code)
            self.command_errors.labels(command, code).inc()

    def report(self, sources: StatusSources) -> None:
        """Read ``sources`` at every scrape, beside the counters, and count its journal's events; once."""
        self.registry.register(_SourcesCollector(sources))
        sources.journal.add_listener(self.observe_event)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SourcesCollector:
    def __init__(self, sources: StatusSources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        # A family without samples (no kernels yet, a reading the machine lacks) is left out.
        return [family for family in self._families() if family.samples]

    def _families(self) -> Iterator[Metric]:
        sources = self.sources
        report = sources.report
        info = InfoMetricFamily("bai_agent", "Identity of this agent")
        info.add_metric(
            [],
            {"agent_id": report.agent_id, "version": report.version, "namespace": sources.config.namespace},
        )
        yield info
        yield _gauge("bai_agent_uptime_seconds", "Seconds since the agent started", report.uptime())
        yield _gauge(
            "bai_agent_etcd_registered",
            "1 when the agent record is registered in etcd",
            int(bool(sources.etcd.registered)),
        )
        yield _gauge("bai_agent_docker_healthy", "1 when the Docker daemon answers", int(sources.docker.healthy))
        yield _gauge("bai_agent_healthy", "1 when /healthz answers 200", int(not sources.health.problems()))
        yield _gauge("bai_agent_amp_connections", "Open manager connections", len(sources.connections))
        yield _gauge("bai_agent_kernel_images", "Local kernel images", len(sources.docker.images))
        yield _gauge("bai_agent_kernels", "Kernels on this agent", sources.kernels.count())
        capacity = GaugeMetricFamily("bai_agent_resource_capacity", "Capacity by resource slot", labels=["slot"])
        used = GaugeMetricFamily("bai_agent_resource_used", "Allocated amount by resource slot", labels=["slot"])
        for slot, amounts in report.resources().items():
            capacity.add_metric([slot], amounts["capacity"])
            used.add_metric([slot], amounts["used"])
        yield capacity
        yield used
        yield from _agent_metrics(sources)
        yield from _service_metrics(sources.kernels.relay_totals())
        yield _gauge("bai_agent_image_pulls", "Image pulls in progress", len(sources.kernels.pulls_in_progress()))
        yield from _pool_metrics(sources.kernels.pool_state())
        records = sources.kernels.records()
        yield from _kernel_metrics(records, stats_readings.kernel_samples(sources.stats))
        node = stats_readings.node_sample(sources.stats)
        if node is not None:
            yield from _node_metrics(node)
            yield from _gpu_metrics(node["gpus"], records)


def _pool_metrics(pool: dict[str, Any]) -> Iterator[Metric]:
    size = GaugeMetricFamily("bai_agent_warm_pool_size", "Warm pool containers wanted, per image", labels=["image"])
    ready = GaugeMetricFamily("bai_agent_warm_pool_ready", "Warm pool containers ready, per image", labels=["image"])
    for image, state in sorted((pool.get("images") or {}).items()):
        size.add_metric([image], state["target"])
        ready.add_metric([image], state["ready"])
    yield size
    yield ready
    yield CounterMetricFamily("bai_agent_warm_pool_claims", "Creates served by the warm pool", value=pool["claims"])
    yield CounterMetricFamily(
        "bai_agent_warm_pool_misses",
        "Creates the warm pool could have served but had no container ready for",
        value=pool["misses"],
    )
    refill = pool.get("last_refill_seconds")
    if refill is not None:
        yield _gauge(
            "bai_agent_warm_pool_refill_seconds", "How long the last warm pool container took to be ready", refill
        )


def _service_metrics(totals: dict[str, int]) -> Iterator[Metric]:
    yield _gauge("bai_agent_services_running", "Services of kernels relayed now", totals["running"])
    connections = CounterMetricFamily(
        "bai_agent_service_relay_connections",
        "Client connections to kernels' services, by outcome (relayed, refused over the bound, failed)",
        labels=["outcome"],
    )
    for outcome, field in (("relayed", "connections"), ("refused", "refused"), ("failed", "failed")):
        connections.add_metric([outcome], totals[field])
    yield connections
    yield CounterMetricFamily(
        "bai_agent_service_relay_idle_closed",
        "Relayed connections closed after the relay's idle timeout without a byte either way",
        value=totals["idle_closed"],
    )
    relayed = CounterMetricFamily(
        "bai_agent_service_relay_bytes", "Bytes relayed to and from kernels' services", labels=["direction"]
    )
    relayed.add_metric(["to_service"], totals["bytes_to_service"])
    relayed.add_metric(["to_client"], totals["bytes_to_client"])
    yield relayed


def _agent_metrics(sources: StatusSources) -> Iterator[Metric]:
    last_delay, largest_delay = readings.heartbeat_delays(sources.etcd)
    yield _gauge(
        "bai_agent_heartbeat_delay_seconds",
        "How late the last etcd heartbeat ran against its schedule",
        last_delay,
    )
    yield _gauge(
        "bai_agent_heartbeat_delay_max_seconds",
        "The largest etcd heartbeat delay since the agent started",
        largest_delay,
    )
    interval = stats_readings.number(sources.etcd.heartbeat_interval)
    if interval is not None:
        yield _gauge(
            "bai_agent_heartbeat_interval_seconds",
            "Seconds between etcd heartbeats (a heartbeat later than this is late)",
            interval,
        )
    last_heartbeat_at = stats_readings.number(sources.etcd.last_heartbeat_at)
    if last_heartbeat_at is not None:
        yield _gauge(
            "bai_agent_heartbeat_last_timestamp_seconds",
            "When the last etcd heartbeat was written (unix time)",
            last_heartbeat_at,
        )
    entries, last_seq = readings.journal_size(sources.journal)
    yield _gauge("bai_agent_events_journal_entries", "Events kept in the event journal", entries)
    yield _gauge("bai_agent_events_last_seq", "Sequence number of the last event in the journal", last_seq)
    yield _gauge(
        "bai_agent_events_journal_file_bytes",
        "Size of the event journal's file (compactions keep it to about twice the kept events)",
        readings.journal_file_bytes(sources.journal),
    )
    seconds = stats_readings.sample_seconds(sources.stats)
    if seconds is not None:
        yield _gauge(
            "bai_agent_stats_sample_seconds",
            "CPU time the last statistics round took",
            seconds,
        )


# (sample field, metric name without _total, help, scale): counters of each kernel.
_KERNEL_COUNTERS = (
    ("cpu_used_ms", "bai_agent_kernel_cpu_seconds", "CPU time the kernel used", 1e-3),
    ("io_read_bytes", "bai_agent_kernel_io_read_bytes", "Bytes the kernel read from block devices", 1),
    ("io_write_bytes", "bai_agent_kernel_io_write_bytes", "Bytes the kernel wrote to block devices", 1),
    ("net_rx_bytes", "bai_agent_kernel_network_receive_bytes", "Bytes the kernel received", 1),
    ("net_tx_bytes", "bai_agent_kernel_network_transmit_bytes", "Bytes the kernel sent", 1),
)
_KERNEL_GAUGES = (
    (
        "cpu_util",
        "bai_agent_kernel_cpu_usage_ratio",
        "CPU use over the last sample, in cores (1 = one core busy)",
        1e-2,
    ),
    ("mem_bytes", "bai_agent_kernel_memory_bytes", "Memory the kernel uses", 1),
    ("mem_max_bytes", "bai_agent_kernel_memory_peak_bytes", "The most memory the kernel has used", 1),
    ("pids", "bai_agent_kernel_pids", "Processes and threads in the kernel", 1),
    ("scratch_bytes", "bai_agent_kernel_scratch_bytes", "Size of the kernel's scratch directory", 1),
    ("sampled_at", "bai_agent_kernel_sample_timestamp_seconds", "When the kernel was last sampled (unix time)", 1),
)


def _kernel_metrics(records: list[dict[str, Any]], samples: dict[str, dict[str, float]]) -> Iterator[Metric]:
    info = InfoMetricFamily("bai_agent_kernel", "Image and status of each kernel", labels=["kernel_id"])
    created = GaugeMetricFamily(
        "bai_agent_kernel_created_timestamp_seconds", "When each kernel was created (unix time)", labels=["kernel_id"]
    )
    last_used = GaugeMetricFamily(
        "bai_agent_kernel_last_used_timestamp_seconds",
        "When each kernel was last used (unix time)",
        labels=["kernel_id"],
    )
    cpu_granted = GaugeMetricFamily(
        "bai_agent_kernel_cpu_granted_cores", "CPU cores granted to each kernel", labels=["kernel_id"]
    )
    mem_granted = GaugeMetricFamily(
        "bai_agent_kernel_memory_granted_bytes", "Memory granted to each kernel", labels=["kernel_id"]
    )
    for record in records:
        kernel_id = record["kernel_id"]
        info.add_metric([kernel_id], {"image": str(record.get("image")), "status": str(record.get("status"))})
        for family, value in (
            (created, record.get("created_at")),
            (last_used, record.get("last_used")),
            (cpu_granted, (record.get("resources") or {}).get("cpu")),
            (mem_granted, (record.get("resources") or {}).get("mem")),
        ):
            known = readings.number(value)
            if known is not None:
                family.add_metric([kernel_id], known)
    yield from (info, created, last_used, cpu_granted, mem_granted)
    for field, name, documentation, scale in _KERNEL_COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=["kernel_id"])
        for kernel_id, sample in sorted(samples.items()):
            if field in sample:
                counter.add_metric([kernel_id], sample[field] * scale)
        yield counter
    for field, name, documentation, scale in _KERNEL_GAUGES:
        family = GaugeMetricFamily(name, documentation, labels=["kernel_id"])
        for kernel_id, sample in sorted(samples.items()):
            if field in sample:
                family.add_metric([kernel_id], sample[field] * scale)
        yield family


def _node_metrics(node: dict[str, Any]) -> Iterator[Metric]:
    def gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation)
        if value is not None:
            family.add_metric([], value)
        return family

    cpu, mem, disk, net = node["cpu"], node["mem"], node["disk"], node["net"]
    yield gauge(
        "bai_agent_node_sample_timestamp_seconds", "When the machine was last sampled (unix time)", node["sampled_at"]
    )
    yield gauge("bai_agent_node_cpus", "CPU cores of the machine", cpu["count"])
    yield gauge(
        "bai_agent_node_cpu_usage_ratio",
        "CPU use of the whole machine over the last sample (1 = every core busy)",
        None if cpu["percent"] is None else cpu["percent"] / 100,
    )
    per_core = GaugeMetricFamily(
        "bai_agent_node_cpu_core_usage_ratio", "CPU use of each core over the last sample", labels=["core"]
    )
    for core, percent in enumerate(cpu["per_core"]):
        if percent is not None:
            per_core.add_metric([str(core)], percent / 100)
    yield per_core
    yield gauge("bai_agent_node_memory_total_bytes", "Memory of the machine", mem["total"])
    yield gauge("bai_agent_node_memory_used_bytes", "Memory in use on the machine", mem["used"])
    yield gauge("bai_agent_node_memory_available_bytes", "Memory available to new processes", mem["available"])
    for key, documentation in (
        ("total", "Size of the file system holding the kernels' scratch directories"),
        ("used", "Bytes used on the scratch file system"),
        ("free", "Bytes free on the scratch file system"),
    ):
        family = GaugeMetricFamily(f"bai_agent_node_scratch_disk_{key}_bytes", documentation, labels=["path"])
        if disk[key] is not None:
            family.add_metric([disk["path"] or ""], disk[key])
        yield family
    for key, name, documentation in (
        ("rx_bytes", "bai_agent_node_network_receive_bytes", "Bytes the machine received"),
        ("tx_bytes", "bai_agent_node_network_transmit_bytes", "Bytes the machine sent"),
    ):
        counter = CounterMetricFamily(name, documentation)
        if net[key] is not None:
            counter.add_metric([], net[key])
        yield counter


def _gpu_metrics(gpus: list[dict[str, Any]], records: list[dict[str, Any]]) -> Iterator[Metric]:
    holders: dict[int, str] = {}
    for record in records:
        for index in readings.kernel_gpus(record):
            holders[index] = record["kernel_id"]
    info = InfoMetricFamily("bai_agent_gpu", "Identity of each NVIDIA device", labels=["device"])
    up = GaugeMetricFamily("bai_agent_gpu_up", "1 when NVML answered for the device", labels=["device"])
    granted = GaugeMetricFamily("bai_agent_gpu_granted", "1 when the device is granted to a kernel", labels=["device"])
    util = GaugeMetricFamily(
        "bai_agent_gpu_utilization_ratio",
        "Share of time the device was busy over NVML's last period",
        labels=["device"],
    )
    mem_used = GaugeMetricFamily("bai_agent_gpu_memory_used_bytes", "Device memory in use", labels=["device"])
    mem_total = GaugeMetricFamily("bai_agent_gpu_memory_total_bytes", "Device memory", labels=["device"])
    for gpu in gpus:
        device = str(gpu["index"])
        info.add_metric([device], {"uuid": gpu["uuid"], "name": gpu["name"]})
        up.add_metric([device], 0 if gpu["error"] else 1)
        granted.add_metric([device], 1 if gpu["index"] in holders else 0)
        if gpu["util_percent"] is not None:
            util.add_metric([device], gpu["util_percent"] / 100)
        if gpu["mem_used"] is not None:
            mem_used.add_metric([device], gpu["mem_used"])
        if gpu["mem_total"] is not None:
            mem_total.add_metric([device], gpu["mem_total"])
    yield from (info, up, granted, util, mem_used, mem_total)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
