"""
``AgentHealth``: whether the agent can do its job (``/healthz``, the page's banner, the
``bai_agent_healthy`` gauge), and the operator-facing notes of what changed.

``watch`` runs every second (a ``PeriodicService`` made by the composition root) and notes
each change of the etcd registration and of Docker's reachability.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

if TYPE_CHECKING:
    from bai_agent.docker.service import DockerService
    from bai_agent.etcd.service import EtcdService
    from bai_agent.kernels.interface import IKernelView
    from bai_agent.stopping import StopFlag

log = Logger()

# Notes kept for the status page.
RECENT_NOTES = 100


class AgentHealth:
    """
    :param docker: the ``DockerService`` (``healthy``, ``last_error``).
    :param etcd: the etcd registration (``registered``, ``last_error``).
    :param kernels: an ``IKernelView`` (``taken_over``).
    :param stopping: the ``StopFlag``.
    """

    def __init__(
        self, clock: IReactorTime, docker: DockerService, etcd: EtcdService, kernels: IKernelView, stopping: StopFlag
    ) -> None:
        self.clock = clock
        self.docker = docker
        self.etcd = etcd
        self.kernels = kernels
        self.stopping = stopping
        self.recent_events: collections.deque[tuple[float, str]] = collections.deque(maxlen=RECENT_NOTES)
        self._seen: dict[str, bool] = {}

    def note(self, message: str) -> None:
        """Remember something an operator should see on the status page."""
        self.recent_events.append((self.clock.seconds(), message))

    def problems(self) -> list[str]:
        """Why the agent is unhealthy; empty when etcd registration and Docker are both fine."""
        problems = []
        if self.stopping.requested:
            problems.append("agent: stopping")
        if not self.etcd.registered:
            problems.append(f"etcd: not registered ({self.etcd.last_error or 'connecting'})")
        if not self.docker.healthy:
            problems.append(f"docker: unreachable ({self.docker.last_error or 'connecting'})")
        elif not self.kernels.taken_over:
            problems.append("kernels: still taking over the kernels of the last run")
        return problems

    def watch(self) -> None:
        """Note every change of etcd and Docker health (called periodically)."""
        for name, component, healthy, good, bad in (
            ("etcd", self.etcd, self.etcd.registered, "registered in etcd", "etcd registration lost"),
            ("docker", self.docker, self.docker.healthy, "Docker daemon reachable", "Docker daemon unreachable"),
        ):
            if self._seen.get(name) != healthy:
                if healthy or name in self._seen:
                    error = "" if healthy else f": {component.last_error}"
                    self.note((good if healthy else bad) + error)
                    log.info("{component} health changed: {healthy}", component=name, healthy=healthy)
                self._seen[name] = healthy
