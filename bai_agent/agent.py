"""
``AgentState``: what the daemon knows about itself, shared by the AMP responders, the
etcd record and the status page, so that all three tell the same story.
"""

import collections

from twisted.logger import Logger

import bai_agent
from bai_agent.protocol.commands import PROTOCOL_VERSION
from bai_agent.status import readings

log = Logger()

MEASURED_MEM_STEP = 128 << 20


class AgentState:
    """
    Built by ``service.build_agent_service``; ``etcd`` is attached once the etcd service
    exists (it needs ``record`` as its record source).
    """

    def __init__(self, config, clock, docker, capacity, metrics):
        self.config = config
        self.clock = clock
        self.docker = docker
        self.etcd = None
        self.capacity = capacity
        self.metrics = metrics
        self.started_at = clock.seconds()
        self.connections = set()
        self.commands_in_flight = set()  # Deferreds of AMP commands not yet answered
        self.stopping = False  # a graceful stop began: no new connections or commands
        self.amp_port = None
        self.http_port = None
        self.kernels = None  # the KernelRegistry, attached by the composition root
        self.journal = None
        self.stats = None  # the StatsCollector (bai_agent.stats.collector), attached likewise
        self.recent_events = collections.deque(maxlen=100)
        self._health_seen = {}

    def note(self, message: str) -> None:
        """Remember something an operator should see on the status page."""
        self.recent_events.append((self.clock.seconds(), message))

    def watch_health(self) -> None:
        """Note every change of etcd and Docker health (called periodically)."""
        registered = self.etcd is not None and self.etcd.registered
        for name, healthy, good, bad in (
            ("etcd", registered, "registered in etcd", "etcd registration lost"),
            ("docker", self.docker.healthy, "Docker daemon reachable", "Docker daemon unreachable"),
        ):
            if self._health_seen.get(name) != healthy:
                if healthy or name in self._health_seen:
                    error = "" if healthy else f": {getattr(getattr(self, name), 'last_error', None)}"
                    self.note((good if healthy else bad) + error)
                    log.info("{component} health changed: {healthy}", component=name, healthy=healthy)
                self._health_seen[name] = healthy

    agent_id = property(lambda self: self.config.agent_id)
    version = property(lambda self: bai_agent.__version__)

    def secret(self):
        return self.etcd.secret if self.etcd is not None else None

    def heartbeat_interval(self) -> float:
        if self.etcd is not None:
            return self.etcd.heartbeat_interval
        return self.config.heartbeat_interval

    def amp_address(self) -> str:
        host = self.config.advertise_host
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.amp_port}" if self.amp_port else ""

    def status_url(self) -> str:
        if not self.http_port:
            return ""
        host, port = self.http_port
        if host in ("", "0.0.0.0", "::"):
            host = self.config.advertise_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def used_resources(self) -> dict:
        if self.kernels is None:
            return {"cpu": 0, "mem": 0, "cuda.device": 0}
        return self.kernels.allocator.used()

    def resources(self) -> dict:
        """Per slot: ``capacity``, ``used`` (granted to kernels) and ``measured`` (in use now, when sampled)."""
        used = self.used_resources()
        measured = self.measured_use()
        resources = {}
        for slot, capacity in self.capacity_slots().items():
            resources[slot] = {"capacity": capacity, "used": used.get(slot, 0)}
            if slot in measured:
                resources[slot]["measured"] = measured[slot]
        return resources

    def measured_use(self) -> dict:
        """
        What the node uses now, from the last statistics sample, in slot units: ``cpu``
        busy cores, ``mem`` bytes, ``cuda.device`` busy devices. Rounded (0.1 core, 128 MiB,
        0.1 device), so that the etcd record changes only when the use really does.
        """
        node = readings.node_sample(self)  # checked: odd readings are None
        if not node:
            return {}
        measured = {}
        cpu, mem = node["cpu"], node["mem"]
        if cpu["percent"] is not None and isinstance(cpu["count"], int):
            measured["cpu"] = round(cpu["percent"] / 100.0 * cpu["count"], 1)
        if isinstance(mem["used"], int):
            measured["mem"] = round(mem["used"] / MEASURED_MEM_STEP) * MEASURED_MEM_STEP
        utils = [gpu["util_percent"] for gpu in node["gpus"] if gpu["util_percent"] is not None]
        if utils:
            measured["cuda.device"] = round(sum(utils) / 100.0, 1)
        return measured

    def capacity_slots(self) -> dict:
        if self.kernels is not None:
            return self.kernels.allocator.capacity.as_slots()
        return self.capacity.as_slots()

    def kernel_count(self) -> int:
        return self.kernels.count() if self.kernels is not None else 0

    def record(self) -> dict:
        """The agent record of PROTOCOL.md section 4 (``status``/``heartbeat_at`` added by etcd)."""
        record = {
            "agent_id": self.agent_id,
            "version": self.version,
            "protocol": PROTOCOL_VERSION,
            "namespace": self.config.namespace,
            "status": "stopping" if self.stopping else "running",
            "amp_endpoint": self.amp_address(),
            "status_url": self.status_url(),
            "started_at": self.started_at,
            "resources": self.resources(),
            "images": sorted({image.name for image in self.docker.images}),
            "kernels": self.kernel_count(),
            # PROTOCOL.md section 6: while true, the kernels of the last run are still being
            # adopted or ended (commands on them wait or answer BACKEND_UNAVAILABLE).
            "taking_over": self.kernels is not None and not self.kernels.taken_over,
        }
        if self.etcd is not None and self.etcd.last_heartbeat_at is not None:
            record["heartbeat_at"] = self.etcd.last_heartbeat_at
        return record

    def problems(self) -> list:
        """Why the agent is unhealthy; empty when etcd registration and Docker are both fine."""
        problems = []
        if self.stopping:
            problems.append("agent: stopping")
        if self.etcd is None or not self.etcd.registered:
            error = self.etcd.last_error if self.etcd is not None else None
            problems.append(f"etcd: not registered ({error or 'connecting'})")
        if not self.docker.healthy:
            problems.append(f"docker: unreachable ({self.docker.last_error or 'connecting'})")
        elif self.kernels is not None and not self.kernels.taken_over:
            problems.append("kernels: still taking over the kernels of the last run")
        return problems

    def uptime(self) -> float:
        return self.clock.seconds() - self.started_at
