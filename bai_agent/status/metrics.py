"""
Prometheus metrics of one agent, in a registry of its own (never the global one, so that
several agents in one process, as in tests, do not collide).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    """Counters the agent updates as it works, plus gauges read from its state at scrape time."""

    def __init__(self):
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
        self.heartbeat_delay = Gauge(
            "bai_agent_heartbeat_delay_seconds",
            "How late the last etcd heartbeat was against the heartbeat interval",
            registry=self.registry,
        )
        self.state = None

    def observe_command(self, command: str, seconds: float, error_code=None):
        self.command_seconds.labels(command).observe(seconds)
        if error_code is not None:
            code = error_code.decode("ascii", "replace") if isinstance(error_code, bytes) else str(error_code)
            self.command_errors.labels(command, code).inc()

    def attach(self, state):
        """Report ``state`` (an ``AgentState``) at every scrape."""
        self.state = state
        self.registry.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        state = self.state
        info = InfoMetricFamily("bai_agent", "Identity of this agent")
        info.add_metric(
            [],
            {"agent_id": state.agent_id, "version": state.version, "namespace": state.config.namespace},
        )
        yield info
        yield _gauge("bai_agent_uptime_seconds", "Seconds since the agent started", state.uptime())
        yield _gauge(
            "bai_agent_etcd_registered",
            "1 when the agent record is registered in etcd",
            int(state.etcd is not None and state.etcd.registered),
        )
        yield _gauge("bai_agent_docker_healthy", "1 when the Docker daemon answers", int(state.docker.healthy))
        yield _gauge("bai_agent_healthy", "1 when /healthz answers 200", int(not state.problems()))
        yield _gauge("bai_agent_amp_connections", "Open manager connections", len(state.connections))
        yield _gauge("bai_agent_kernel_images", "Local kernel images", len(state.docker.images))
        yield _gauge("bai_agent_kernels", "Kernels on this agent", state.kernel_count())
        capacity = GaugeMetricFamily("bai_agent_resource_capacity", "Capacity by resource slot", labels=["slot"])
        used = GaugeMetricFamily("bai_agent_resource_used", "Allocated amount by resource slot", labels=["slot"])
        for slot, amounts in state.resources().items():
            capacity.add_metric([slot], amounts["capacity"])
            used.add_metric([slot], amounts["used"])
        yield capacity
        yield used


def _gauge(name, documentation, value):
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
