"""
``StatusSources``: everything the status page and ``/metrics`` read, each part required,
handed over by the composition root. Nothing here is written by the page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from bai_agent.config import AgentConfig
from bai_agent.health import AgentHealth
from bai_agent.report import AgentReport

if TYPE_CHECKING:
    from bai_agent.docker.service import DockerService
    from bai_agent.etcd.service import EtcdService
    from bai_agent.kernels.interface import IKernelView
    from bai_agent.kernels.journal import EventJournal
    from bai_agent.rpc.server import AgentAMP
    from bai_agent.stats.collector import StatsCollector
    from bai_agent.status.history import StatsHistory


@attrs.frozen
class StatusSources:
    config: AgentConfig
    clock: IReactorTime
    report: AgentReport
    health: AgentHealth
    #: The agent record with its last heartbeat (``bai_agent.report.agent_info``).
    info: Callable[[], dict[str, Any]]
    #: An ``IKernelView``.
    kernels: IKernelView
    #: The event journal (``last_seq``, ``since``, ``len``).
    journal: EventJournal
    #: The statistics collector (``latest_all``, ``node_latest``, ``sample_seconds``).
    stats: StatsCollector
    #: The etcd registration (``registered``, ``last_error``, ``last_heartbeat_at``,
    #: ``heartbeat_interval``, ``heartbeat_delay``, ``heartbeat_delay_max``).
    etcd: EtcdService
    #: The ``DockerService`` (``healthy``, ``last_error``, versions, ``images``).
    docker: DockerService
    #: The open manager connections (the AMP context's set).
    connections: set[AgentAMP]
    #: The last hour of the statistics (``to_json``), recorded after each round.
    history: StatsHistory
