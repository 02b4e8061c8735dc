"""
``AgentReport``: the agent's account of itself, the record of PROTOCOL.md section 4 that
the etcd registration writes, ``GetAgentInfo`` answers and the status page shows, so that
all three tell the same story.

It reads what the composition root gives it (the configuration, the Docker images, a view
of the kernels, the statistics collector, the stop flag), each required; the listening
ports arrive when the servers listen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

import bai_agent
from bai_agent.config import AgentConfig
from bai_agent.kernels.interface import IKernelView
from bai_agent.protocol.commands import PROTOCOL_VERSION
from bai_agent.stats import readings

if TYPE_CHECKING:
    from bai_agent.docker.service import DockerService
    from bai_agent.etcd.service import EtcdService
    from bai_agent.stats.collector import StatsCollector
    from bai_agent.stopping import StopFlag

# Measured memory is rounded to this step, so that the record changes only when use does.
MEASURED_MEM_STEP = 128 << 20


class AgentReport:
    """
    :param images: what lists the local kernel images (``DockerService``: ``.images``).
    :param kernels: an ``IKernelView``.
    :param stats: the ``StatsCollector`` (its last node sample gives the measured use).
    :param stopping: the ``StopFlag`` a graceful stop raises.
    """

    def __init__(
        self,
        config: AgentConfig,
        clock: IReactorTime,
        images: DockerService,
        kernels: IKernelView,
        stats: StatsCollector,
        stopping: StopFlag,
    ) -> None:
        self.config = config
        self.clock = clock
        self.images = images
        self.kernels = kernels
        self.stats = stats
        self.stopping = stopping
        self.started_at = clock.seconds()
        self.amp_port: int | None = None
        self.http_port: tuple[str, int] | None = None  # (host, port)

    agent_id = property(lambda self: self.config.agent_id)
    version = property(lambda self: bai_agent.__version__)

    def uptime(self) -> float:
        return self.clock.seconds() - self.started_at

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

    def resources(self) -> dict[str, dict[str, Any]]:
        """Per slot: ``capacity``, ``used`` (granted to kernels) and ``measured`` (in use now, when sampled)."""
        allocator = self.kernels.allocator
        used = allocator.used()
        measured = self.measured_use()
        resources: dict[str, dict[str, Any]] = {}
        for slot, capacity in allocator.capacity.as_slots().items():
            resources[slot] = {"capacity": capacity, "used": used.get(slot, 0)}
            if slot in measured:
                resources[slot]["measured"] = measured[slot]
        return resources

    def measured_use(self) -> dict[str, float]:
        """
        What the node uses now, from the last statistics sample, in slot units: ``cpu``
        busy cores, ``mem`` bytes, ``cuda.device`` busy devices. Rounded (0.1 core, 128 MiB,
        0.1 device), so that the etcd record changes only when the use really does.
        """
        node = readings.node_sample(self.stats)  # checked: odd readings are None
        if not node:
            return {}
        measured: dict[str, float] = {}
        cpu, mem = node["cpu"], node["mem"]
        if cpu["percent"] is not None and isinstance(cpu["count"], int):
            measured["cpu"] = round(cpu["percent"] / 100.0 * cpu["count"], 1)
        if isinstance(mem["used"], int):
            measured["mem"] = round(mem["used"] / MEASURED_MEM_STEP) * MEASURED_MEM_STEP
        utils = [gpu["util_percent"] for gpu in node["gpus"] if gpu["util_percent"] is not None]
        if utils:
            measured["cuda.device"] = round(sum(utils) / 100.0, 1)
        return measured

    def record(self) -> dict[str, Any]:
        """The agent record of PROTOCOL.md section 4 (the registration adds ``heartbeat_at``)."""
        return {
            "agent_id": self.agent_id,
            "version": self.version,
            "protocol": PROTOCOL_VERSION,
            "namespace": self.config.namespace,
            "status": "stopping" if self.stopping.requested else "running",
            "amp_endpoint": self.amp_address(),
            "status_url": self.status_url(),
            "started_at": self.started_at,
            "resources": self.resources(),
            "images": sorted({image.name for image in self.images.images}),
            "kernels": self.kernels.count(),
            # PROTOCOL.md section 6: while true, the kernels of the last run are still being
            # adopted or ended (commands on them wait or answer BACKEND_UNAVAILABLE).
            "taking_over": not self.kernels.taken_over,
        }


def agent_info(report: AgentReport, registration: EtcdService) -> dict[str, Any]:
    """The record as ``GetAgentInfo`` and the status page give it: with the last heartbeat's time."""
    record = report.record()
    if registration.last_heartbeat_at is not None:
        record["heartbeat_at"] = registration.last_heartbeat_at
    return record
