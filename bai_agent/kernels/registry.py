"""
The ``kernels`` service: every kernel of this agent, from ``CreateKernel`` to its end.

It owns the lifecycle of each kernel (one ``Kernel`` and its lock): create, destroy,
restart, reset, the idle timeout, and the end of every kernel (``_finish``). Its helpers,
each given the pieces it uses:

- ``DeathWatch`` (``deaths.py``): Docker ``die``/``oom`` events, broken runner links and the
  re-list every 10 s (events can be missed); kernels that end by themselves.
- ``TakeOver`` (``takeover.py``): the kernels a previous run of the agent left.
- ``PassThrough`` (``passthrough.py``): files, logs and statistics of a kernel.

Rules that keep it from leaking:

- Operations on one kernel are serialised by the kernel's lock, and each re-checks the
  kernel's status once it holds it. A create reserves its id before any ``yield``.
- Every grant is released exactly once, in ``_finish``, whatever ended the kernel:
  destroy, death, reset or a failed create. ``_finish`` also removes the container and
  the directories and journals ``kernel-terminated``.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bai_agent.docker.images import KernelImage, kernel_image_from_inspect
from bai_agent.docker.interface import DockerConflict, DockerError, DockerNotFound, DockerUnavailable, IDockerBackend
from bai_agent.images.credentials import Credentials, parse_registry_auth
from bai_agent.images.pulls import ImagePulls
from bai_agent.images.references import InvalidReference, parse_reference
from bai_agent.kernels import kernel as states
from bai_agent.kernels import pinned_mounts
from bai_agent.kernels.allocator import Allocator, Grant, ResourceRequest, parse_resource_request
from bai_agent.kernels.cgroup_limits import CgroupLimitsError
from bai_agent.kernels.container import claim_resources, container_config, container_name, user_environment
from bai_agent.kernels.deaths import RUNNER_START_TIMEOUT, ConnectRunner, DeathWatch
from bai_agent.kernels.deferreds import pass_to, share
from bai_agent.kernels.execution import ExecutionSession
from bai_agent.kernels.interface import IKernelOperations, IKernelView
from bai_agent.kernels.journal import EventJournal
from bai_agent.kernels.kernel import Kernel
from bai_agent.kernels.passthrough import PassThrough
from bai_agent.kernels.spec import check_environ, check_kernel_id, check_timeout, resolve_mounts
from bai_agent.kernels.takeover import TakeOver
from bai_agent.kernels.warm_pool import PoolEntry, WarmPool
from bai_agent.kernels.workspace import Workspace
from bai_agent.protocol import errors, events
from bai_agent.runtime.inflight import InFlight
from bai_agent.runtime.periodic import PeriodicService
from bai_agent.services.kernel_services import KernelServices
from bai_agent.services.ports import PortPool

if TYPE_CHECKING:
    from bai_agent.config import AgentConfig
    from bai_agent.docker.service import DockerService
    from bai_agent.stats.collector import KernelTarget, StatsCollector

RELIST_INTERVAL = 10.0
IDLE_CHECK_INTERVAL = 1.0
STOP_GRACE = 2
TAKING_OVER = "the agent is still taking over the kernels of its last run; retry"


@implementer(IKernelOperations, IKernelView)
class KernelRegistry(Service):
    """
    :param reactor: the reactor (``IReactorTime`` for timers; the runner connector needs
        ``IReactorUNIX`` too).
    :param config: the ``AgentConfig``.
    :param docker: the ``DockerService`` (images, health, events).
    :param backend: the ``IDockerBackend`` containers are made with.
    :param allocator: the ``Allocator`` of this machine.
    :param journal: the ``EventJournal`` (opened by this service).
    :param connect_runner: ``(reactor, socket_path, clock, timeout) -> Deferred[RunnerLink]``.
    :param run_blocking: ``(f, *args) -> Deferred``, running disk work off the reactor thread.
    :param cluster_config: a callable returning the etcd tunables (``idle_timeout``, ...).
    :param scratch_volumes: the ``node.scratch.ScratchVolumes`` that limit kernels' homes
        to their ``scratch`` grant; None: plain directories.
    :param cgroup_limits: the ``CgroupLimits`` that give a warm claim its limits at once
        (Docker's update follows); None: the claim waits for Docker's update.
    :param pulls: the ``ImagePulls`` of images creates need (and of ``PullImage``);
        by default one that finds no credentials in etcd.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        docker: DockerService,
        backend: IDockerBackend,
        allocator: Allocator,
        journal: EventJournal,
        connect_runner: ConnectRunner,
        run_blocking: Callable[..., Deferred[Any]],
        runner_dir: str,
        cluster_config: Callable[[], dict[str, Any]] = dict,
        scratch_volumes: Any = None,
        pulls: ImagePulls | None = None,
        cgroup_limits: Any = None,
    ) -> None:
        self.reactor = reactor
        self.cgroup_limits = cgroup_limits
        self.pulls = pulls or ImagePulls(reactor, backend, docker, journal, lambda registry: succeed(None))
        self.config = config
        self.docker = docker
        self.backend = backend
        self.allocator = allocator
        self.journal = journal
        self.connect_runner = connect_runner
        self.run_blocking = run_blocking
        self.runner_dir = runner_dir
        self.cluster_config = cluster_config
        self.scratch_volumes = scratch_volumes
        self.kernels: dict[str, Kernel] = {}
        low, high = config.service_port_range
        self.services = KernelServices(
            reactor,
            backend,
            PortPool(reactor, low, high),
            config.relay_host,
            journal,
            run_dir=lambda kernel_id: self.workspace(kernel_id).run_dir,
            save=lambda kernel_id, services: run_blocking(self.workspace(kernel_id).save_services, services),
        )
        self.pool = WarmPool(
            reactor,
            config,
            backend,
            docker,
            run_blocking,
            connect_runner,
            runner_dir,
            scratch_volumes,
            allocator.capacity.mem,
        )
        self.in_flight = InFlight()
        self._announced_stopping = False
        self._unsubscribe: list[Callable[[], None]] = []
        self.passthrough = PassThrough(
            reactor, backend, run_blocking, self._home_of, max_upload_size=config.max_upload_size
        )
        self.deaths = DeathWatch(
            reactor,
            config.agent_id,
            backend,
            self.kernels,
            self.in_flight,
            connect_runner,
            socket_path=lambda kernel_id: self.workspace(kernel_id).socket_path,
            end=self._finish,
            is_running=lambda: bool(self.running),
            service_message=self.services.handle,
        )
        self.takeover = TakeOver(
            reactor,
            config,
            docker,
            backend,
            journal,
            allocator,
            self.kernels,
            self.in_flight,
            run_blocking,
            self.workspace,
            scratch_volumes,
            self.deaths,
            self.services,
            self.pool,
            end=self._finish,
            is_running=lambda: bool(self.running),
        )
        self._relist = PeriodicService(reactor, RELIST_INTERVAL, self.reconcile, what="kernel re-list", now=False)
        self._idle = PeriodicService(reactor, IDLE_CHECK_INTERVAL, self.expire_idle, what="idle expiry", now=False)

    # -- what others read ------------------------------------------------------------------

    @property
    def stats(self) -> StatsCollector | None:
        """The ``StatsCollector``, attached by the composition root (None: no statistics)."""
        return self.passthrough.stats

    @stats.setter
    def stats(self, collector: StatsCollector | None) -> None:
        self.passthrough.stats = collector

    @property
    def recovered(self) -> bool:
        """Every kernel of the last run is known (the take-over's first part)."""
        return self.takeover.recovered

    @property
    def taken_over(self) -> bool:
        """And every one is adopted or ended (its second part)."""
        return self.takeover.taken_over

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.journal.open()
        self._unsubscribe.append(self.docker.subscribe(self.deaths.docker_event))
        self._unsubscribe.append(self.docker.subscribe(self.pool.docker_event))
        self._relist.startService()
        self._idle.startService()
        self.journal.append(events.AGENT_STARTED, data={"agent_id": self.config.agent_id})
        self._unsubscribe.append(self.docker.subscribe(lambda event: self.takeover.maybe_recover()))
        self._unsubscribe.append(self.docker.on_connected(self._docker_connected))
        self.takeover.maybe_recover()

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        rounds = [loop.stopService() for loop in (self._relist, self._idle) if loop.running]
        while self._unsubscribe:
            self._unsubscribe.pop(0)()
        for kernel in self.kernels.values():
            # A runner being reached (the take-over, a broken link) is not waited for: the
            # kernel lives on, and the next run takes it over.
            if kernel.reconnecting is not None:
                kernel.reconnecting.cancel()
        for kernel in list(self.kernels.values()):
            if kernel.pulling is not None:
                kernel.pulling.cancel()  # its create fails: a pull may take half an hour
        self.pulls.stop()
        yield DeferredList(rounds, consumeErrors=True)
        yield self.pool.stop(destroy=self.config.destroy_kernels_on_stop)
        yield self.in_flight.settled()
        self.announce_stopping()
        for kernel in self.kernels.values():
            if kernel.link is not None:
                kernel.link.close("agent stopping")
        self.journal.close()

    def announce_stopping(self) -> None:
        """Journal ``agent-stopping`` (once per run): the last event of this run."""
        if not self._announced_stopping:
            self._announced_stopping = True
            self.journal.append(events.AGENT_STOPPING, data={"agent_id": self.config.agent_id})

    def _docker_connected(self) -> None:
        """Docker answers again (after an outage, say): look at once for what happened meanwhile."""
        if self.recovered:
            self._relist.run_now()
        else:
            self.takeover.maybe_recover()

    def reconcile(self) -> Deferred[Any] | None:
        """One round of the re-list (the take-over first, until it has run)."""
        if not self.docker.healthy:
            return None
        if not self.recovered:
            return self.takeover.maybe_recover()
        return self.deaths.relist()

    def expire_idle(self) -> None:
        """One round of the idle timeout: running kernels unused for longer are destroyed."""
        self.takeover.maybe_recover()  # Docker may have become reachable since the last look
        now = self.reactor.seconds()
        for kernel in list(self.kernels.values()):
            if (
                kernel.status == states.RUNNING
                and kernel.idle_timeout
                and kernel.terminated is None
                and now - kernel.last_used > kernel.idle_timeout
            ):
                self.log.info(
                    "kernel {kernel_id} idle for {idle:.0f}s", kernel_id=kernel.kernel_id, idle=now - kernel.last_used
                )
                self.destroy(kernel.kernel_id, events.IDLE_TIMEOUT).addErrback(
                    lambda failure: self.log.failure("idle destroy failed", failure)
                )

    # -- queries -------------------------------------------------------------------------

    def get(self, kernel_id: str) -> Kernel:
        check_kernel_id(kernel_id)
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.status == states.TERMINATED:
            if not self.recovered:
                # It may be a kernel of the last run, not found yet: never a false "gone".
                raise errors.BackendUnavailable(TAKING_OVER)
            raise errors.KernelNotFound(f"no kernel {kernel_id!r} on this agent")
        return kernel

    def touch(self, kernel_id: str) -> Kernel:
        """Look a kernel up for a command on it, which counts as use for the idle timeout."""
        kernel = self.get(kernel_id)
        kernel.last_used = self.reactor.seconds()
        return kernel

    def session(self, kernel_id: str) -> ExecutionSession:
        """The execution session of a running kernel (for Execute and friends)."""
        kernel = self.touch(kernel_id)
        if kernel.status != states.RUNNING:
            raise errors.KernelNotRunning(f"kernel {kernel_id} is {kernel.status}")
        if kernel.session is None:
            # Running, but its runner is being reached (after a restart, or a broken link).
            raise errors.BackendUnavailable(
                f"kernel {kernel_id} is running; the agent is reconnecting to its runner, retry"
            )
        return kernel.session

    def list_records(self) -> list[dict[str, Any]]:
        """``ListKernels``: every kernel, or ``BackendUnavailable`` while some may still be unknown."""
        if not self.recovered:
            raise errors.BackendUnavailable(TAKING_OVER)
        return self.records()

    def records(self, reveal: bool = True) -> list[dict[str, Any]]:
        """
        The kernels known now (for the page and the record; ``list_records`` for managers);
        with ``reveal`` false, the services' URLs hide their tokens (the status page).
        """
        return [
            dict(kernel.record(), services=self.services.records(kernel.kernel_id, reveal))
            for kernel in sorted(self.kernels.values(), key=lambda k: k.created_at)
        ]

    def relay_totals(self) -> dict[str, int]:
        return self.services.relay_totals()

    def pool_state(self) -> dict[str, Any]:
        return self.pool.describe()

    def pulls_in_progress(self) -> list[dict[str, Any]]:
        return self.pulls.in_progress()

    def count(self) -> int:
        return len(self.kernels)

    def workspace(self, kernel_id: str) -> Workspace:
        return Workspace(self.config.scratch_root, self.config.state_dir, kernel_id, self.scratch_volumes)

    def _home_of(self, kernel_id: str) -> str:
        return self.workspace(kernel_id).scratch_dir

    # -- files, logs, statistics (PassThrough) ----------------------------------------------

    def upload(self, kernel_id: str, path: str, data: bytes, append: bool) -> Deferred[Any]:
        return self.passthrough.upload(self.touch(kernel_id), path, data, append)

    def download(self, kernel_id: str, path: str, offset: int, length: int) -> Deferred[Any]:
        return self.passthrough.download(self.touch(kernel_id), path, offset, length)

    def list_files(self, kernel_id: str, path: str) -> Deferred[Any]:
        return self.passthrough.list_files(self.touch(kernel_id), path)

    @inlineCallbacks
    def logs(self, kernel_id: str, tail: int | None = None) -> Generator[Deferred[Any], Any, str]:
        """The container's output (the runner's own log), from the Engine API."""
        text: str = yield self.passthrough.logs(self.touch(kernel_id), tail)
        return text

    def stats_targets(self) -> list[KernelTarget]:
        """The kernels the statistics collector samples: those with a running container."""
        return self.passthrough.targets(self.kernels.values())

    @inlineCallbacks
    def kernel_stats(self, kernel_id: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """The latest statistics sample of a kernel (a fresh one if it has none yet)."""
        sample: dict[str, Any] = yield self.passthrough.kernel_stats(self.get(kernel_id))
        return sample

    # -- services (KernelServices) -----------------------------------------------------------

    def start_service(self, kernel_id: str, service: str, options: Any = None) -> Deferred[dict[str, Any]]:
        return self.services.start(self.touch(kernel_id), service, options)

    def stop_service(self, kernel_id: str, service: str) -> Deferred[None]:
        return self.services.stop(self.touch(kernel_id), service)

    def list_services(self, kernel_id: str) -> list[dict[str, Any]]:
        return self.services.listing(self.get(kernel_id))

    # -- create --------------------------------------------------------------------------

    def create(
        self,
        kernel_id: str,
        image: str,
        resources: Any,
        environ: dict[str, str] | None = None,
        mounts: Any = None,
        idle_timeout: int | None = None,
        exec_timeout: int | None = None,
        image_pull: str | None = None,
        registry_auth: Any = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Validate, reserve the id, then start the kernel; fires with its record. An image
        that is not local (or ``image_pull`` ``always``) is pulled first, without a grant:
        the kernel is ``creating`` meanwhile, and a destroy ends the wait.
        """
        if not self.running:
            raise errors.BackendUnavailable("the agent is stopping")
        if not self.recovered:
            raise errors.BackendUnavailable(TAKING_OVER)
        check_kernel_id(kernel_id)
        if not isinstance(image, str) or not image:
            raise errors.InvalidRequest("image must be a non-empty name")
        environ = check_environ(environ)
        resolved_mounts = resolve_mounts(mounts, self.config.allowed_mount_roots)
        tunables = self.cluster_config()
        idle_timeout = check_timeout("idle_timeout", idle_timeout, tunables.get("idle_timeout", 0))
        exec_timeout = check_timeout("exec_timeout", exec_timeout, tunables.get("exec_timeout", 0))
        request = parse_resource_request(resources, self.allocator.capacity, self.config.default_scratch_size)
        policy = check_pull_policy(image_pull)
        credentials = parse_registry_auth(registry_auth)
        if kernel_id in self.kernels:
            raise errors.KernelExists(f"kernel {kernel_id!r} exists ({self.kernels[kernel_id].status})")
        if not self.docker.healthy:
            raise errors.BackendUnavailable(f"Docker is unreachable: {self.docker.last_error}")
        listed = self.listed_image(image)
        now = self.reactor.seconds()
        kernel = Kernel(
            kernel_id=kernel_id,
            image=listed or KernelImage(name=image, id=""),
            grant=Grant(kernel_id=kernel_id, cpu=0.0, mem=0),
            environ=environ,
            mounts=resolved_mounts,
            idle_timeout=idle_timeout,
            exec_timeout=exec_timeout,
            created_at=now,
            last_used=now,
        )
        if listed is not None and policy != PULL_ALWAYS:
            # The usual case, with nothing to wait for before the grant.
            kernel.grant = self._grant(kernel_id, listed, request)
            self.kernels[kernel_id] = kernel
            entry = self._pool_entry(listed, request, resolved_mounts)
            if entry is not None:
                claimed = kernel.lock.run(self._claim, kernel, entry)
                return self.in_flight.track(claimed.addBoth(self._refill))
            return self.in_flight.track(kernel.lock.run(self._create, kernel))
        reference = None
        if policy != PULL_NEVER:
            try:
                reference = parse_reference(image)
            except InvalidReference as e:
                raise errors.InvalidRequest(f"image {image!r} is not an image reference: {e}") from None
        self.kernels[kernel_id] = kernel
        return self.in_flight.track(self._create_pulled(kernel, request, policy, reference, credentials))

    def _pool_entry(self, image: KernelImage, request: ResourceRequest, mounts: Any) -> PoolEntry | None:
        """A warm container for a create the pool can serve (no GPUs, no mounts, the default home size)."""
        if mounts or request.cuda_devices or request.scratch not in (0, self.config.default_scratch_size):
            return None
        return self.pool.take(image)

    @inlineCallbacks
    def _claim(self, kernel: Kernel, entry: PoolEntry) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """
        Make a warm pool container the kernel's (docs/protocol.md section 9): its limits and
        its directories at once, then the runner's environment; its name right after the
        answer. A claim that fails before the container is the kernel's leaves it to a
        cold create.
        """
        started = time.monotonic()
        self.journal.append(events.KERNEL_CREATING, kernel.kernel_id, {"image": kernel.image.name})
        kernel.warm, kernel.pool_id, kernel.container_id = True, entry.pool_id, entry.container_id
        workspace = self.workspace(kernel.kernel_id)
        environ = user_environment(kernel)
        assert entry.container_id is not None
        update = self.backend.update_container(
            entry.container_id, claim_resources(kernel.grant, self.config.kernel_pids_limit)
        )
        done_at: dict[str, float] = {}
        update.addBoth(_note_time, done_at, "update", started)
        steps = [self.run_blocking(entry.workspace.claim, workspace, kernel.saved_state(), environ)]
        steps[0].addBoth(_note_time, done_at, "dirs", started)
        if self._limit_now(kernel, entry.container_id):
            done_at["cgroup"] = time.monotonic() - started
            self.in_flight.track(update.addErrback(self._update_failed, kernel))
        else:
            steps.append(update)
        results = yield DeferredList(steps, consumeErrors=True)
        failed = [failure for ok, failure in results if not ok]
        if failed or kernel.status != states.CREATING or entry.link is None or not entry.link.alive:
            why = failed[0].getErrorMessage() if failed else "its runner went away"
            self.log.warn(
                "kernel {kernel_id}: the warm container could not be claimed ({why}); creating it cold",
                kernel_id=kernel.kernel_id,
                why=why,
            )
            yield self._undo_claim(kernel, entry, workspace)
            if kernel.status != states.CREATING:
                raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} ended while it was being created")
            return (yield self._create(kernel, announced=True))
        link = entry.link
        link.send({"type": "claim", "environ": environ})
        self.deaths.attach(kernel, link)
        kernel.status = states.RUNNING
        self.journal.append(events.KERNEL_STARTED, kernel.kernel_id, kernel.record())
        # The name is for people and the next run (which renames what a kill left unnamed),
        # not for the answer: it is given right after, not to wait on Docker's lock twice.
        self.in_flight.track(self._name_claimed(kernel))
        self.log.info(
            "kernel {kernel_id} started warm in {elapsed:.4f}s ({steps})",
            kernel_id=kernel.kernel_id,
            elapsed=time.monotonic() - started,
            steps=", ".join(
                f"{step} at {at * 1000:.1f} ms" for step, at in sorted(done_at.items(), key=lambda i: i[1])
            ),
        )
        return kernel.record()

    def _limit_now(self, kernel: Kernel, container_id: str) -> bool:
        """Write the grant's limits into the container's cgroup (the claim then need not wait for Docker's)."""
        if self.cgroup_limits is None:
            return False
        try:
            self.cgroup_limits.apply(container_id, kernel.grant)
        except CgroupLimitsError as e:
            self.log.warn(
                "kernel {kernel_id}: {error}; waiting for Docker's update", kernel_id=kernel.kernel_id, error=e
            )
            return False
        return True

    def _update_failed(self, failure: Failure, kernel: Kernel) -> None:
        # The limits are in force (written to the cgroup); Docker's record of them is not.
        if kernel.status != states.RUNNING:
            return  # ended meanwhile: its container is gone
        self.log.error(
            "kernel {kernel_id}: Docker refused the limits the cgroup already has: {error}",
            kernel_id=kernel.kernel_id,
            error=failure.getErrorMessage(),
        )

    def _refill(self, result: Any) -> Any:
        self.pool.kick()
        return result

    @inlineCallbacks
    def _name_claimed(self, kernel: Kernel) -> Generator[Deferred[Any], Any, None]:
        try:
            if kernel.container_id is not None and kernel.status == states.RUNNING:
                yield self.backend.rename_container(
                    kernel.container_id, container_name(self.config.agent_id, kernel.kernel_id)
                )
        except DockerError as e:
            if kernel.status == states.RUNNING:
                self.log.warn(
                    "kernel {kernel_id}: its container kept its pool name: {error}", kernel_id=kernel.kernel_id, error=e
                )

    @inlineCallbacks
    def _undo_claim(
        self, kernel: Kernel, entry: PoolEntry, workspace: Workspace
    ) -> Generator[Deferred[Any], Any, None]:
        """Remove the pool container a claim could not finish, and what of it moved into the kernel's place."""
        kernel.warm, kernel.pool_id, kernel.container_id = False, None, None
        yield self.pool.discard(entry)
        try:
            yield self.run_blocking(workspace.remove)
        except Exception as e:
            self.log.warn(
                "kernel {kernel_id}: could not clear its directories: {error}", kernel_id=kernel.kernel_id, error=e
            )

    def listed_image(self, name: str) -> KernelImage | None:
        """The local kernel image listed as ``name`` (``name:tag``), or None."""
        for kernel_image in self.docker.images:
            if kernel_image.name == name:
                return kernel_image
        return None

    def _grant(self, kernel_id: str, image: KernelImage, request: ResourceRequest) -> Grant:
        if image.min_mem and request.mem < image.min_mem:
            raise errors.InvalidRequest(
                f"image {image.name} needs at least {image.min_mem} bytes of memory, asked for {request.mem}"
            )
        return self.allocator.allocate(kernel_id, request)  # InsufficientResources escapes as is

    @inlineCallbacks
    def _create_pulled(
        self,
        kernel: Kernel,
        request: ResourceRequest,
        policy: str,
        reference: Any,
        credentials: Credentials | None,
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """A create whose image is not listed: found by Docker (a digest), or pulled, then granted and started."""
        announced = False
        try:
            image = None if policy == PULL_ALWAYS else (yield self._inspected_image(kernel.image.name))
            if image is None:
                if reference is None:
                    raise errors.ImageNotFound(f"no local kernel image {kernel.image.name!r} (and image_pull is never)")
                self.journal.append(events.KERNEL_CREATING, kernel.kernel_id, {"image": str(reference)})
                announced = True
                kernel.pulling = self.pulls.pull(reference, credentials)
                try:
                    image = yield kernel.pulling
                finally:
                    kernel.pulling = None
                if image is None:
                    raise errors.InvalidRequest(
                        f"{reference} was pulled, but it is not a kernel image (labelled ai.backend.kernelspec=1); "
                        "it is kept, not offered"
                    )
            if kernel.status != states.CREATING:
                raise CancelledError()
            kernel.grant = self._grant(kernel.kernel_id, image, request)
            kernel.image = image
        except Exception as e:
            if kernel.status == states.CREATING and self.kernels.get(kernel.kernel_id) is kernel:
                if announced:
                    yield kernel.lock.run(self._end_creating, kernel)
                else:
                    del self.kernels[kernel.kernel_id]
            if isinstance(e, CancelledError):
                if not self.running:
                    raise errors.BackendUnavailable("the agent stopped while the kernel's image was pulled") from None
                raise errors.KernelCreationFailed(
                    f"kernel {kernel.kernel_id} was destroyed while its image was pulled"
                ) from None
            if isinstance(e, DockerError):
                raise errors.BackendUnavailable(f"Docker could not be asked for the image: {e}") from e
            raise
        return (yield kernel.lock.run(self._create, kernel, announced))

    def _end_creating(self, kernel: Kernel) -> Deferred[None] | None:
        """A create that failed before its container: ended, unless a destroy ended it first."""
        if kernel.status != states.CREATING:
            return None
        return self._finish(kernel, events.CREATION_FAILED)

    @inlineCallbacks
    def _inspected_image(self, name: str) -> Generator[Deferred[Any], Any, KernelImage | None]:
        """
        The local image ``name`` as Docker finds it (a digest reference is listed under no
        tag), or None when Docker has none; ``ImageNotFound`` when it is not a kernel image.
        """
        try:
            document = yield self.backend.inspect_image(name)
        except DockerNotFound:
            return None
        image = kernel_image_from_inspect(name, document)
        if image is None:
            raise errors.ImageNotFound(
                f"the local image {name!r} is not a kernel image (labelled ai.backend.kernelspec=1)"
            )
        return image

    @inlineCallbacks
    def _create(self, kernel: Kernel, announced: bool = False) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        started = time.monotonic()
        if not announced:
            self.journal.append(events.KERNEL_CREATING, kernel.kernel_id, {"image": kernel.image.name})
        workspace = self.workspace(kernel.kernel_id)
        steps: dict[str, float] = {}
        try:
            yield self.run_blocking(workspace.create)
            steps["dirs"] = time.monotonic() - started
            # The home's limit (an image to make and mount, say) is set up while Docker
            # creates the container, which needs the home's path, not what is in it.
            limiting = self.run_blocking(workspace.limit_home, kernel.grant.scratch)
            yield self._start_container(kernel, workspace, steps, limiting)
        except Exception as e:
            failure = Failure()
            self.log.warn(
                "kernel {kernel_id} could not be created: {error}", kernel_id=kernel.kernel_id, error=_describe(e)
            )
            yield self._finish(kernel, events.CREATION_FAILED)
            if isinstance(e, (DockerUnavailable,)):
                raise errors.BackendUnavailable(f"Docker is unreachable: {e}") from e
            if isinstance(e, errors.AgentError):
                failure.raiseException()
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} could not be started: {_describe(e)}") from e
        if kernel.status != states.CREATING:
            # Died (or was reset) while its runner was being reached: _finish has run.
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} ended while starting")
        kernel.status = states.RUNNING
        self.journal.append(events.KERNEL_STARTED, kernel.kernel_id, kernel.record())
        self.log.info(
            "kernel {kernel_id} started in {elapsed:.3f}s ({steps})",
            kernel_id=kernel.kernel_id,
            elapsed=time.monotonic() - started,
            steps=", ".join(f"{step} at {at * 1000:.0f} ms" for step, at in steps.items()),
        )
        return kernel.record()

    @inlineCallbacks
    def _start_container(
        self,
        kernel: Kernel,
        workspace: Workspace,
        steps: dict[str, float] | None = None,
        limiting: Deferred[Any] | None = None,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Create and start the container and wait for its runner to answer; ``limiting``,
        if given, is the Deferred of the home's limit, awaited before the start (and
        whatever happens, so that nothing is removed while it is being made).
        """
        steps = {} if steps is None else steps
        started = time.monotonic() - steps.get("dirs", 0)
        # Mount sources are checked again at every (re)create, and Docker is handed what
        # was checked, pinned; the pins go once the container has its own mounts.
        binds = yield self.run_blocking(
            pinned_mounts.pin, workspace.state_dir, kernel.mounts, self.config.allowed_mount_roots
        )
        try:
            body = container_config(
                kernel,
                workspace,
                self.config.agent_id,
                self.runner_dir,
                self.config.kernel_network,
                self.config.kernel_pids_limit,
                mount_binds=binds,
            )
            container_id = kernel.container_id = yield self.backend.create_container(
                container_name(self.config.agent_id, kernel.kernel_id), body
            )
            steps["created"] = time.monotonic() - started
            yield self.run_blocking(workspace.save, kernel.saved_state())
            yield self.run_blocking(workspace.write_environ, user_environment(kernel))
            steps["saved"] = time.monotonic() - started
            if limiting is not None:
                waiting: Deferred[Any] = limiting
                limiting = None
                yield waiting
                steps["home limited"] = time.monotonic() - started
            yield self.backend.start_container(container_id)
            steps["docker started"] = time.monotonic() - started
        finally:
            if limiting is not None:
                yield DeferredList([limiting], consumeErrors=True)
            if binds:
                yield self.run_blocking(pinned_mounts.unpin, workspace.state_dir)
        link = yield self.connect_runner(self.reactor, workspace.socket_path, self.reactor, RUNNER_START_TIMEOUT)
        steps["runner answered"] = time.monotonic() - started
        self.deaths.attach(kernel, link)

    # -- images ------------------------------------------------------------------------------

    def pull_image(self, image: Any, registry_auth: Any = None) -> Deferred[dict[str, Any]]:
        """``PullImage``: the pulled image's ``ListImages`` entry (``INVALID_REQUEST`` if not a kernel image)."""
        try:
            reference = parse_reference(image)
        except InvalidReference as e:
            raise errors.InvalidRequest(f"image is not an image reference: {e}") from None
        credentials = parse_registry_auth(registry_auth)
        if not self.running:
            raise errors.BackendUnavailable("the agent is stopping")
        if not self.docker.healthy:
            raise errors.BackendUnavailable(f"Docker is unreachable: {self.docker.last_error}")

        def pulled(kernel_image: KernelImage | None) -> dict[str, Any]:
            if kernel_image is None:
                raise errors.InvalidRequest(
                    f"{reference} was pulled, but it is not a kernel image (labelled ai.backend.kernelspec=1); "
                    "it is kept, not offered"
                )
            return kernel_image.to_json()

        return self.in_flight.track(self.pulls.pull(reference, credentials).addCallback(pulled))

    @inlineCallbacks
    def remove_image(self, image: Any) -> Generator[Deferred[Any], Any, None]:
        """
        ``RemoveImage`` of a kernel image (a name Docker lists it under, or a digest
        reference): ``IMAGE_IN_USE`` while a kernel runs it, ``IMAGE_NOT_FOUND`` for an
        image that is not a local kernel image (other images on the machine are not the
        agent's to remove).
        """
        if not isinstance(image, str) or not image:
            raise errors.InvalidRequest("image must be a non-empty name")
        try:
            parse_reference(image)
        except InvalidReference as e:
            raise errors.InvalidRequest(f"image is not an image reference: {e}") from None
        if not self.docker.healthy:
            raise errors.BackendUnavailable(f"Docker is unreachable: {self.docker.last_error}")
        kernel_image = self.listed_image(image) or (yield self._inspected_image(image))
        if kernel_image is None:
            raise errors.ImageNotFound(f"no local kernel image {image!r}")
        users = sorted(
            kernel.kernel_id
            for kernel in self.kernels.values()
            if kernel.status != states.TERMINATED and kernel.image.id == kernel_image.id
        )
        if users:
            raise errors.ImageInUse(f"image {image} is used by kernel(s) {', '.join(users[:10])}")
        if self.pool.keeps(kernel_image):
            raise errors.ImageInUse(f"the warm pool keeps image {image}: take it out of --warm-pool / warm_pool first")
        try:
            yield self.backend.remove_image(image)
        except DockerNotFound:
            raise errors.ImageNotFound(f"no local kernel image {image!r}") from None
        except DockerConflict as e:
            raise errors.ImageInUse(f"Docker will not remove {image}: {e}") from None
        except DockerError as e:
            raise errors.BackendUnavailable(f"Docker could not remove {image}: {e}") from e
        yield self.docker.refresh_images()
        self.log.info("removed image {image}", image=image)

    # -- destroy, restart, reset ---------------------------------------------------------

    def destroy(self, kernel_id: str, reason: str = events.USER_REQUESTED) -> Deferred[dict[str, Any]]:
        """Destroy a kernel; fires with ``{kernel_id, exit_code, stats}``."""
        kernel = self.get(kernel_id)
        if reason not in events.DESTROY_REASONS:
            reasons = ", ".join(events.DESTROY_REASONS)
            raise errors.InvalidRequest(f"reason must be one of {reasons}; got {reason!r}")
        return self._destroy_kernel(kernel, reason)

    def _destroy_kernel(self, kernel: Kernel, reason: str) -> Deferred[dict[str, Any]]:
        if kernel.terminated is not None:
            # A destroy (or a death) is already under way: share its answer.
            return share(kernel.terminated)
        terminated: Deferred[dict[str, Any]] = Deferred()
        kernel.terminated = terminated

        def retry_later(failure: Failure) -> Failure:
            # Docker was away: the kernel is as it was, and a later destroy tries again.
            kernel.terminated = None
            return failure

        d = self.in_flight.track(kernel.lock.run(self._destroy, kernel, reason))
        d.addErrback(retry_later)
        d.addBoth(pass_to, terminated)
        return share(terminated)

    @inlineCallbacks
    def _destroy(self, kernel: Kernel, reason: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        if kernel.status == states.TERMINATED:
            return kernel.answer()
        if kernel.pulling is not None:
            # It waits for its image: it ends now, and the pull goes on for the others.
            kernel.status = states.TERMINATING
            kernel.pulling.cancel()
        if kernel.container_id is not None:
            yield self.passthrough.sample_before_stop(kernel)
            try:
                yield self.backend.stop_container(kernel.container_id, timeout=STOP_GRACE)
                state = yield self.backend.inspect_container(kernel.container_id)
                kernel.exit_code = state.get("State", {}).get("ExitCode")
            except DockerNotFound:
                pass
            except DockerError as e:
                raise errors.BackendUnavailable(f"could not stop kernel {kernel.kernel_id}: {e}") from e
        kernel.status = states.TERMINATING
        if kernel.link is not None:
            kernel.link.close("kernel destroyed")
        yield self._finish(kernel, reason)
        return kernel.answer()

    def restart(self, kernel_id: str) -> Deferred[dict[str, Any]]:
        kernel = self.touch(kernel_id)
        if kernel.terminated is not None:
            raise errors.KernelNotFound(f"kernel {kernel_id!r} is being destroyed")
        return self.in_flight.track(kernel.lock.run(self._restart, kernel))

    @inlineCallbacks
    def _restart(self, kernel: Kernel) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        if kernel.status != states.RUNNING:
            raise errors.KernelNotFound(f"kernel {kernel.kernel_id!r} is {kernel.status}")
        kernel.status = states.RESTARTING
        yield self.services.kernel_stopping(kernel, events.RESTARTING)
        if kernel.link is not None:
            kernel.link.close("kernel restarting")
            kernel.link = None
            kernel.session = None
        workspace = self.workspace(kernel.kernel_id)
        old_container = kernel.container_id
        exit_code = None
        try:
            yield self.passthrough.sample_before_stop(kernel)
            try:
                yield self.backend.stop_container(old_container, timeout=STOP_GRACE)
                state = yield self.backend.inspect_container(old_container)
                exit_code = state.get("State", {}).get("ExitCode")
                yield self.backend.remove_container(old_container, force=True)
            except DockerNotFound:
                pass
            kernel.container_id = None
            self.passthrough.keep_last_sample(kernel)
            self.journal.append(
                events.KERNEL_TERMINATED,
                kernel.kernel_id,
                {"reason": events.RESTARTING, "exit_code": exit_code, "stats": dict(kernel.last_stats)},
            )
            yield self.run_blocking(workspace.clear_run_dir)
            yield self._start_container(kernel, workspace)
        except Exception as e:
            self.log.warn(
                "kernel {kernel_id} could not restart: {error}", kernel_id=kernel.kernel_id, error=_describe(e)
            )
            yield self._finish(kernel, events.CREATION_FAILED)
            raise errors.KernelCreationFailed(
                f"kernel {kernel.kernel_id} could not be restarted: {_describe(e)}"
            ) from e
        if kernel.status != states.RESTARTING:
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} ended while restarting")
        kernel.status = states.RUNNING
        kernel.exit_code = None
        self.journal.append(events.KERNEL_RESTARTED, kernel.kernel_id, kernel.record())
        return kernel.record()

    def reset(self) -> Deferred[int]:
        """Destroy every kernel (reason ``agent-reset``); fires with how many."""
        return self.destroy_all(events.AGENT_RESET)

    @inlineCallbacks
    def destroy_all(self, reason: str) -> Generator[Deferred[Any], Any, int]:
        """Destroy every kernel with ``reason`` (``agent-reset``, ``agent-stopping``); fires with how many."""
        kernels = [kernel for kernel in self.kernels.values() if kernel.status != states.TERMINATED]
        results = yield DeferredList(
            [maybeDeferred(self._destroy_kernel, kernel, reason) for kernel in kernels],
            consumeErrors=True,
        )
        for ok, failure in results:
            if not ok:
                self.log.warn(
                    "a kernel could not be destroyed ({reason}): {error}",
                    reason=reason,
                    error=failure.getErrorMessage(),
                )
        return sum(1 for ok, _ in results if ok)

    # -- the end of every kernel -----------------------------------------------------------

    @inlineCallbacks
    def _finish(self, kernel: Kernel, reason: str) -> Generator[Deferred[Any], Any, None]:
        """
        Remove the container and the directories, release the grant, journal the end.
        Runs once per kernel (the caller holds its lock and checked its status).
        """
        if kernel.reconnecting is not None:
            kernel.reconnecting.cancel()
        yield self.services.kernel_stopping(kernel, reason)
        # By name when the id is unknown: a create whose answer was lost may still have
        # made the container.
        container = kernel.container_id or container_name(self.config.agent_id, kernel.kernel_id)
        try:
            yield self.backend.remove_container(container, force=True)
        except DockerNotFound:
            pass
        except DockerError as e:
            # The re-list finds it again; never leave the grant held for it.
            self.log.error(
                "could not remove container {container} of kernel {kernel_id}: {error}",
                container=container,
                kernel_id=kernel.kernel_id,
                error=e,
            )
        try:
            yield self.run_blocking(self.workspace(kernel.kernel_id).remove)
        except OSError as e:
            self.log.error(
                "could not remove the directories of kernel {kernel_id}: {error}", kernel_id=kernel.kernel_id, error=e
            )
        except Exception:
            # Whatever the home held, the kernel ends: its grant, its id and its event
            # must never wait on a removal that failed in an unforeseen way.
            self.log.failure("could not remove the directories of kernel {kernel_id}", kernel_id=kernel.kernel_id)
        self.allocator.release(kernel.kernel_id)
        self.passthrough.keep_last_sample(kernel)
        kernel.status = states.TERMINATED
        kernel.link = None
        kernel.session = None
        if self.kernels.get(kernel.kernel_id) is kernel:
            del self.kernels[kernel.kernel_id]
        self.log.info(
            "kernel {kernel_id} terminated ({reason}, exit code {exit_code})",
            kernel_id=kernel.kernel_id,
            reason=reason,
            exit_code=kernel.exit_code,
        )
        self.journal.append(
            events.KERNEL_TERMINATED,
            kernel.kernel_id,
            {"reason": reason, "exit_code": kernel.exit_code, "stats": dict(kernel.last_stats)},
        )


def _note_time(result: Any, done_at: dict[str, float], name: str, started: float) -> Any:
    done_at[name] = time.monotonic() - started
    return result


PULL_MISSING = "missing"
PULL_ALWAYS = "always"
PULL_NEVER = "never"
PULL_POLICIES = (PULL_MISSING, PULL_ALWAYS, PULL_NEVER)


def check_pull_policy(value: Any) -> str:
    """``image_pull``: ``missing`` (the default), ``always`` or ``never``."""
    if value is None:
        return PULL_MISSING
    if value not in PULL_POLICIES:
        raise errors.InvalidRequest("image_pull must be one of missing, always, never")
    return str(value)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
