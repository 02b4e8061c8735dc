"""
``StatusSources``: everything the status page and ``/metrics`` read, each part required,
handed over by the composition root. Nothing here is written by the page.
"""

from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from bai_agent.config import AgentConfig
from bai_agent.health import AgentHealth
from bai_agent.report import AgentReport


@attrs.frozen
class StatusSources:
    config: AgentConfig
    clock: IReactorTime
    report: AgentReport
    health: AgentHealth
    #: The agent record with its last heartbeat (``bai_agent.report.agent_info``).
    info: Callable[[], dict]
    #: An ``IKernelView``.
    kernels: Any
    #: The event journal (``last_seq``, ``since``, ``len``).
    journal: Any
    #: The statistics collector (``latest_all``, ``node_latest``, ``sample_seconds``).
    stats: Any
    #: The etcd registration (``registered``, ``last_error``, ``last_heartbeat_at``,
    #: ``heartbeat_interval``, ``heartbeat_delay``, ``heartbeat_delay_max``).
    etcd: Any
    #: The ``DockerService`` (``healthy``, ``last_error``, versions, ``images``).
    docker: Any
    #: The open manager connections (the AMP context's set).
    connections: set
