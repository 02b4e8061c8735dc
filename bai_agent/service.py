"""
The composition root: ``build_agent_service`` makes the one ``MultiService`` named
``bai-agent`` with its named children, started in this order and stopped in reverse:
``docker``, ``etcd``, ``kernels``, ``stats``, ``amp``, ``status``.
"""

import os

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from bai_agent.agent import AgentState
from bai_agent.config import ensure_private_dir
from bai_agent.docker.engine import DockerEngineClient
from bai_agent.docker.service import DockerService
from bai_agent.etcd.service import EtcdService
from bai_agent.etcd.txetcd import TxEtcd
from bai_agent.kernels.allocator import Allocator
from bai_agent.kernels.gpus import discover_gpus
from bai_agent.kernels.journal import EventJournal
from bai_agent.kernels.registry import KernelRegistry
from bai_agent.kernels.runner_link import connect_runner as default_connect_runner
from bai_agent.node import scratch
from bai_agent.resources import detect_capacity
from bai_agent.rpc.server import AgentAMPFactory
from bai_agent.runner import RUNNER_DIR
from bai_agent.stats.cgroups import CgroupReader
from bai_agent.stats.collector import StatsCollector
from bai_agent.stats.gpu import GpuStats
from bai_agent.stats.node import NodeStats
from bai_agent.status.metrics import AgentMetrics
from bai_agent.status.page import StatusPage
from bai_agent.status.site import StatusSite
from bai_agent.stopping import GracefulStop

log = Logger()

# Seconds between two statistics rounds (kernels, node, GPUs).
STATS_INTERVAL = 5.0


class ListeningService(StreamServerEndpointService):
    """
    A server endpoint service that fails start-up loudly when it cannot listen (a taken
    port) and tells ``on_listening`` the port it got (``tcp:0`` picks a free one).
    """

    def __init__(self, description, endpoint, factory, on_listening):
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.on_listening = on_listening

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
            raise SystemExit(f"bai-agent: cannot listen on {self.description} for {self.name}: {reason}")
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.on_listening(port)
        return port


class AgentService(MultiService):
    """
    The ``bai-agent`` service. A stop first runs ``graceful_stop`` (see
    ``bai_agent.stopping``), then its children stop in reverse order, then the clients the
    composition root made for them are closed.
    """

    def __init__(self):
        super().__init__()
        self.owned_clients = []
        self.thread_pools = []
        self.graceful_stop = None

    def startService(self):
        try:
            super().startService()
        except BaseException:
            # A child failed to start (a taken port raises SystemExit): the process is
            # about to exit, and must not hang on a worker thread an earlier child started.
            for pool in self.thread_pools:
                if pool.started:
                    pool.stop()
            raise

    def stopService(self):
        if self.graceful_stop is not None:
            d = self.graceful_stop.run()
            d.addErrback(lambda failure: log.failure("the graceful part of the stop failed", failure))
        else:
            d = succeed(None)
        d.addCallback(lambda _: MultiService.stopService(self))

        def close_clients(_):
            for client in self.owned_clients:
                try:
                    client.close()
                except Exception:
                    log.failure("closing {client} failed", client=client)

        return d.addBoth(close_clients)


def build_agent_service(
    reactor,
    config,
    docker_backend=None,
    etcd=None,
    nvml=None,
    connect_runner=None,
    run_blocking=None,
    cgroups=None,
    scratch_volumes=None,
) -> MultiService:
    """
    Build the agent from a validated ``AgentConfig``. ``docker_backend`` (an
    ``IDockerBackend``), ``etcd`` (an ``IEtcd``), ``nvml`` (the pynvml module),
    ``connect_runner``, ``run_blocking`` (disk work off the reactor thread),
    ``cgroups`` (a ``CgroupReader``) and ``scratch_volumes`` (a
    ``node.scratch.ScratchVolumes``, detected from ``config.scratch_type``) default to the
    real ones; tests pass fakes.
    """
    compile_runner()
    ensure_private_dir(config.scratch_root, "scratch root")
    ensure_private_dir(config.state_dir, "state dir")
    if scratch_volumes is None:
        scratch_volumes = scratch.detect(config.scratch_root, config.scratch_type)  # ValueError: a start-up error
    if not scratch_volumes.enforced:
        log.warn(
            "--scratch-type dir: kernels' homes are not limited; one kernel can fill the disk of {root}",
            root=config.scratch_root,
        )
    else:
        log.info("kernels' homes limited by {kind} on {root}", kind=scratch_volumes.kind, root=config.scratch_root)
    gpus = discover_gpus(nvml)
    capacity = detect_capacity(
        config.reserved_cpu,
        config.reserved_mem,
        cuda_devices=len(gpus),
        scratch=scratch.capacity_of(config.scratch_root),
    )

    top = AgentService()
    top.setName("bai-agent")
    if docker_backend is None:
        docker_backend = DockerEngineClient(reactor, config.docker_host)
    if etcd is None:
        etcd = TxEtcd(reactor, config.etcd_url)
        top.owned_clients.append(etcd)

    docker = DockerService(reactor, docker_backend)
    docker.setName("docker")
    docker.setServiceParent(top)

    metrics = AgentMetrics()
    state = AgentState(config, reactor, docker, capacity, metrics)
    metrics.attach(state)
    top.agent_state = state

    etcd_service = EtcdService(
        reactor,
        etcd,
        config.namespace,
        config.agent_id,
        state.record,
        heartbeat_interval=config.heartbeat_interval,
        secret_file=config.secret_file,
        secret_cache_path=config.secret_cache_path,
    )
    etcd_service.setName("etcd")
    etcd_service.setServiceParent(top)
    state.etcd = etcd_service

    allocator = Allocator(capacity, gpus)
    journal = EventJournal(os.path.join(config.state_dir, "events.jsonl"), reactor)
    disk_pool = ThreadPool(minthreads=0, maxthreads=4, name="bai-agent-disk")
    if run_blocking is None:
        top.thread_pools.append(disk_pool)
    kernels = KernelRegistry(
        reactor,
        config,
        docker,
        docker_backend,
        allocator,
        journal,
        connect_runner=connect_runner or default_connect_runner,
        run_blocking=run_blocking or (lambda f, *args: deferToThreadPool(reactor, disk_pool, f, *args)),
        runner_dir=RUNNER_DIR,
        cluster_config=lambda: etcd_service.cluster_config,
        thread_pool=None if run_blocking else disk_pool,
        scratch_volumes=scratch_volumes,
    )
    kernels.setName("kernels")
    kernels.setServiceParent(top)
    state.kernels = kernels
    state.journal = journal

    if gpus and nvml is None:
        import pynvml as nvml  # discovery found devices, so it imports
    stats = StatsCollector(
        reactor,
        cgroups or CgroupReader(),
        kernels.stats_targets,
        run_blocking=kernels.run_blocking,
        node=NodeStats(config.scratch_root),
        gpus=GpuStats(nvml, gpus) if gpus else None,
        interval=STATS_INTERVAL,
    )
    stats.setName("stats")
    stats.setServiceParent(top)
    kernels.stats = state.stats = stats

    graceful_stop = top.graceful_stop = GracefulStop(
        reactor, state, config.stop_grace_period, config.destroy_kernels_on_stop
    )

    def amp_listening(port):
        graceful_stop.amp_port = port
        state.amp_port = port.getHost().port
        log.info("AMP listening on {address}", address=state.amp_address())
        etcd_service.refresh_now()

    amp_factory = AgentAMPFactory(state)
    etcd_service.add_secret_listener(amp_factory.secret_changed)
    amp_service = ListeningService(
        config.amp_endpoint, serverFromString(reactor, config.amp_endpoint), amp_factory, amp_listening
    )
    amp_service.setName("amp")
    amp_service.setServiceParent(top)

    status = MultiService()
    status.setName("status")
    status.setServiceParent(top)

    def http_listening(port):
        address = port.getHost()
        state.http_port = (address.host, address.port)
        log.info("status page on {url}", url=state.status_url())
        etcd_service.refresh_now()

    site = StatusSite(StatusPage(state).app.resource(), reactor)
    site.displayTracebacks = False
    site.noisy = False
    http_service = ListeningService(
        config.http_endpoint, serverFromString(reactor, config.http_endpoint), site, http_listening
    )
    http_service.setName("http")
    http_service.setServiceParent(status)
    health_watch = TimerService(1.0, _never_raise(state.watch_health))
    health_watch.clock = reactor
    health_watch.setServiceParent(status)
    return top


def compile_runner():
    """
    Write the runner's bytecode next to it, once, before the reactor runs: the runner
    directory is mounted read-only into kernels, and without a cache each kernel's Python
    would compile the runner again at start. A read-only install (bytecode written at
    install time, or not writable) is fine as it is.
    """
    import compileall

    try:
        compileall.compile_dir(RUNNER_DIR, quiet=2, workers=1)
    except OSError as e:
        log.info("runner bytecode not written: {error}", error=e)


def _never_raise(function):
    def call():
        try:
            function()
        except Exception:
            log.failure("periodic {name} failed", name=function.__name__)

    return call
