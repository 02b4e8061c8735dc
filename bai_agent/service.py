"""
The composition root: ``build_agent_service`` makes the one ``MultiService`` named
``bai-agent`` with its named children, started in this order and stopped in reverse:
``docker``, ``etcd``, ``kernels``, ``stats``, ``amp``, ``status``.

Every part is built once, complete, in dependency order, and each consumer is given the
narrow thing it uses: the AMP responders an ``AmpContext`` (the kernels as
``IKernelOperations``), the page ``StatusSources`` (the kernels as ``IKernelView``), the
etcd registration the ``AgentReport``'s record. The backends (Docker, etcd, runners, disk
threads, cgroups, scratch volumes, the machine's GPUs and capacity) are made outside, by
``tap.make_backends`` for a real agent and by tests with fakes. Nothing here touches the
machine: the backends' makers probe it and create directories.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

import bai_agent
from bai_agent.config import AgentConfig
from bai_agent.docker.service import DockerService
from bai_agent.etcd.service import EtcdService
from bai_agent.health import AgentHealth
from bai_agent.images.credentials import RegistryCredentials
from bai_agent.images.pulls import ImagePulls
from bai_agent.kernels.allocator import Allocator
from bai_agent.kernels.journal import EventJournal
from bai_agent.kernels.registry import KernelRegistry
from bai_agent.node.gpus import GpuDevice
from bai_agent.protocol.keys import WARM_POOL
from bai_agent.report import AgentReport, agent_info
from bai_agent.rpc.server import AgentAMPFactory, AmpContext
from bai_agent.runner import RUNNER_DIR
from bai_agent.runtime.periodic import PeriodicService
from bai_agent.stats.collector import StatsCollector
from bai_agent.stats.gpu import GpuStats
from bai_agent.stats.node import NodeStats
from bai_agent.status.history import StatsHistory
from bai_agent.status.metrics import AgentMetrics
from bai_agent.status.page import StatusPage
from bai_agent.status.site import StatusSite
from bai_agent.status.sources import StatusSources
from bai_agent.stopping import GracefulStop, StopFlag

log = Logger()

# The event journal's file in the state dir.
EVENT_JOURNAL_NAME = "events.jsonl"
# Seconds between two statistics rounds (kernels, node, GPUs).
STATS_INTERVAL = 5.0
# Seconds between two looks at etcd's and Docker's health (for the page's notes).
HEALTH_WATCH_INTERVAL = 1.0


@attrs.frozen
class Backends:
    """What the agent works through; ``tap.make_backends`` makes the real ones."""

    #: An ``IDockerBackend`` (``DockerEngineClient``).
    docker: Any
    #: An ``IEtcd`` (``TxEtcd``).
    etcd: Any
    #: ``connect_runner(reactor, socket_path, ...)``: a kernel's runner link.
    connect_runner: Callable[..., Deferred[Any]]
    #: ``run_blocking(f, *args)``: disk work off the reactor thread.
    run_blocking: Callable[..., Deferred[Any]]
    #: Reads kernels' cgroups (``CgroupReader``).
    cgroups: Any
    #: The ``node.scratch.ScratchVolumes`` that limit kernels' homes.
    scratch_volumes: Any
    #: The machine's ``Capacity`` (cores, memory, GPUs, scratch disk).
    capacity: Any
    #: The NVIDIA devices found (``GpuDevice``), and the NVML module that found them.
    gpus: tuple[GpuDevice, ...] = ()
    nvml: Any = None
    #: Writes a warm claim's limits into its cgroup (``CgroupLimits``); None: Docker's update only.
    cgroup_limits: Any = None
    #: The ``ThreadPool`` behind ``run_blocking``, started and stopped with the kernels.
    thread_pool: Any = None
    #: Clients to close once every service has stopped.
    owned: tuple = ()


class ListeningService(StreamServerEndpointService):
    """
    A server endpoint service that fails start-up loudly when it cannot listen (a taken
    port) and tells ``on_listening`` the port it got (``tcp:0`` picks a free one).
    """

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        on_listening: Callable[[IListeningPort], object],
    ) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.on_listening = on_listening

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
            raise SystemExit(f"bai-agent: cannot listen on {self.description} for {self.name}: {reason}") from None
        listening = self._waitingForPort
        assert listening is not None  # the listen just started
        listening.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.on_listening(port)
        return port


class AgentService(MultiService):
    """
    The ``bai-agent`` service. A stop first runs ``graceful_stop`` (see
    ``bai_agent.stopping``), then its children stop in reverse order, then the backends'
    clients are closed. What it was built from stays readable (``report``, ``health``,
    ``kernels``, ``amp``), for tests and tools that look inside a running agent.
    """

    def __init__(
        self,
        graceful_stop: GracefulStop,
        backends: Backends,
        report: AgentReport,
        health: AgentHealth,
        kernels: KernelRegistry,
        amp: AmpContext,
    ) -> None:
        super().__init__()
        self.setName("bai-agent")
        self.graceful_stop = graceful_stop
        self.backends = backends
        self.report = report
        self.health = health
        self.kernels = kernels
        self.amp = amp

    def startService(self) -> None:
        # The disk threads serve every child (the etcd secret cache, homes, statistics):
        # they start before the first child and stop after the last.
        pool = self.backends.thread_pool
        if pool is not None:
            pool.start()
        try:
            super().startService()
        except BaseException:
            # A child failed to start (a taken port raises SystemExit): the process is
            # about to exit, and must not hang on a worker thread.
            self._stop_thread_pool()
            raise

    def _stop_thread_pool(self) -> None:
        pool = self.backends.thread_pool
        if pool is not None and pool.started:
            pool.stop()

    def stopService(self) -> Deferred[None]:
        d = self.graceful_stop.run()
        d.addErrback(lambda failure: log.failure("the graceful part of the stop failed", failure))
        d.addCallback(lambda _: MultiService.stopService(self))

        def close_clients(_: object) -> None:
            self._stop_thread_pool()
            for client in self.backends.owned:
                try:
                    client.close()
                except Exception:
                    log.failure("closing {client} failed", client=client)

        return d.addBoth(close_clients)


def build_agent_service(reactor: Any, config: AgentConfig, backends: Backends) -> AgentService:
    """Build the agent from a validated ``AgentConfig`` and its ``Backends``."""
    stopping = StopFlag()
    metrics = AgentMetrics()

    docker = DockerService(reactor, backends.docker)
    journal = EventJournal(os.path.join(config.state_dir, EVENT_JOURNAL_NAME), reactor)
    allocator = Allocator(backends.capacity, list(backends.gpus))
    pulls = ImagePulls(
        reactor,
        backends.docker,
        docker,
        journal,
        # Read at each pull that needs them: an operator's change applies without a restart.
        RegistryCredentials(backends.etcd, config.namespace).lookup,
        timeout=config.image_pull_timeout,
        stall_timeout=config.image_pull_stall_timeout,
    )
    # The etcd service is built after the report whose record it writes, and the kernels
    # read the cluster's tunables from it: they ask for them when they need them.
    kernels = KernelRegistry(
        reactor,
        config,
        docker,
        backends.docker,
        allocator,
        journal,
        connect_runner=backends.connect_runner,
        run_blocking=backends.run_blocking,
        runner_dir=RUNNER_DIR,
        cluster_config=lambda: etcd.cluster_config,
        scratch_volumes=backends.scratch_volumes,
        pulls=pulls,
        cgroup_limits=backends.cgroup_limits,
    )
    stats = StatsCollector(
        reactor,
        backends.cgroups,
        kernels.stats_targets,
        run_blocking=backends.run_blocking,
        node=NodeStats(config.scratch_root),
        gpus=GpuStats(backends.nvml, list(backends.gpus)) if backends.gpus else None,
        interval=STATS_INTERVAL,
    )
    kernels.stats = stats
    history = StatsHistory(STATS_INTERVAL)
    stats.add_round_listener(lambda: history.record_from(stats))
    report = AgentReport(config, reactor, docker, kernels, stats, stopping)
    etcd = EtcdService(
        reactor,
        backends.etcd,
        config.namespace,
        config.agent_id,
        report.record,
        heartbeat_interval=config.heartbeat_interval,
        secret_file=config.secret_file,
        secret_cache_path=config.secret_cache_path,
        run_blocking=backends.run_blocking,
    )
    health = AgentHealth(reactor, docker, etcd, kernels, stopping)

    def info() -> dict:
        return agent_info(report, etcd)

    amp = AmpContext(
        clock=reactor,
        agent_id=config.agent_id,
        version=bai_agent.__version__,
        kernels=kernels,
        journal=journal,
        images=docker,
        info=info,
        secret=lambda: etcd.secret,
        observe_command=metrics.observe_command,
        heartbeat_interval=lambda: etcd.heartbeat_interval,
        stopping=stopping,
        authentication_deadline=config.authentication_deadline,
    )
    amp_factory = AgentAMPFactory(amp)
    etcd.add_secret_listener(amp_factory.secret_changed)

    def cluster_config_changed(name: str, value: Any) -> None:
        if name == WARM_POOL:
            kernels.pool.set_targets(value)  # None (removed): back to --warm-pool

    etcd.add_config_listener(cluster_config_changed)
    sources = StatusSources(
        config=config,
        clock=reactor,
        report=report,
        health=health,
        info=info,
        kernels=kernels,
        journal=journal,
        stats=stats,
        etcd=etcd,
        docker=docker,
        connections=amp.connections,
        history=history,
    )
    metrics.report(sources)
    graceful_stop = GracefulStop(
        reactor,
        stopping,
        amp,
        kernels,
        etcd.refresh_now,
        health.note,
        config.stop_grace_period,
        config.destroy_kernels_on_stop,
    )

    def amp_listening(port):
        graceful_stop.amp_port = port
        report.amp_port = port.getHost().port
        log.info("AMP listening on {address}", address=report.amp_address())
        etcd.refresh_now()

    def http_listening(port):
        address = port.getHost()
        report.http_port = (address.host, address.port)
        log.info("status page on {url}", url=report.status_url())
        etcd.refresh_now()

    site = StatusSite(StatusPage(sources, metrics).app.resource(), reactor)
    site.displayTracebacks = False
    site.noisy = False

    top = AgentService(graceful_stop, backends, report, health, kernels, amp)
    for name, child in (
        ("docker", docker),
        ("etcd", etcd),
        ("kernels", kernels),
        ("stats", stats),
        (
            "amp",
            ListeningService(
                config.amp_endpoint, serverFromString(reactor, config.amp_endpoint), amp_factory, amp_listening
            ),
        ),
    ):
        child.setName(name)
        child.setServiceParent(top)
    status = MultiService()
    status.setName("status")
    status.setServiceParent(top)
    http = ListeningService(config.http_endpoint, serverFromString(reactor, config.http_endpoint), site, http_listening)
    http.setName("http")
    http.setServiceParent(status)
    PeriodicService(reactor, HEALTH_WATCH_INTERVAL, health.watch, what="health watch").setServiceParent(status)
    return top
