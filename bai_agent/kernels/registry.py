"""
The ``kernels`` service: every kernel of this agent, from ``CreateKernel`` to its end.

It owns the lifecycle of each kernel (one ``Kernel`` and its lock), the resource grants
(``Allocator``), the kernels' directories (``Workspace``, disk work in a thread pool), the
runner links, death detection (Docker ``die``/``oom`` events plus a re-list every 10 s,
since events can be missed), idle timeouts, and the event journal.

Rules that keep it from leaking:

- Operations on one kernel are serialised by the kernel's lock, and each re-checks the
  kernel's status once it holds it. A create reserves its id before any ``yield``.
- Every grant is released exactly once, in ``_finish``, whatever ended the kernel:
  destroy, death, reset or a failed create. ``_finish`` also removes the container and
  the directories and journals ``kernel-terminated``.
"""

import math
import time

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.docker.images import KernelImage
from bai_agent.docker.interface import DockerError, DockerNotFound, DockerUnavailable
from bai_agent.kernels import files, pinned_mounts
from bai_agent.kernels import kernel as states
from bai_agent.kernels.allocator import Grant, parse_resource_request
from bai_agent.kernels.container import (
    AGENT_ID_LABEL,
    KERNEL_ID_LABEL,
    container_config,
    container_name,
    user_environment,
)
from bai_agent.kernels.execution import ExecutionSession
from bai_agent.kernels.kernel import Kernel
from bai_agent.kernels.spec import (
    check_environ,
    check_kernel_id,
    check_kernel_id_quietly,
    check_timeout,
    resolve_mounts,
)
from bai_agent.kernels.workspace import (
    Workspace,
    kernel_key,
    leftover_kernel_ids,
    load_saved_states,
    remove_state_dirs_except,
)
from bai_agent.protocol import errors
from bai_agent.stats.collector import KernelTarget, empty_sample

RELIST_INTERVAL = 10.0
IDLE_CHECK_INTERVAL = 1.0
RUNNER_START_TIMEOUT = 30.0
STOP_GRACE = 2
# The reasons a manager may give to DestroyKernel; the agent's own (``agent-stopping`` on
# ``--destroy-kernels-on-stop``, ``oom-killed``, ...) are not for managers to claim.
DESTROY_REASONS = ("user-requested", "idle-timeout", "exec-timeout", "agent-reset")
TAKING_OVER = "the agent is still taking over the kernels of its last run; retry"


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
    :param thread_pool: a ``ThreadPool`` behind ``run_blocking`` to start and stop with
        this service, if any.
    :param scratch_volumes: the ``node.scratch.ScratchVolumes`` that limit kernels' homes
        to their ``scratch`` grant; None: plain directories.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        config,
        docker,
        backend,
        allocator,
        journal,
        connect_runner,
        run_blocking,
        runner_dir,
        cluster_config=dict,
        thread_pool=None,
        scratch_volumes=None,
    ):
        self.reactor = reactor
        self.config = config
        self.docker = docker
        self.backend = backend
        self.allocator = allocator
        self.journal = journal
        self.connect_runner = connect_runner
        self.run_blocking = run_blocking
        self.runner_dir = runner_dir
        self.cluster_config = cluster_config
        self.thread_pool = thread_pool
        self.scratch_volumes = scratch_volumes
        self.kernels = {}
        self.stats = None  # the StatsCollector, attached by the composition root
        self.recovered = False  # every kernel of the last run is known (the take-over's first part)
        self.taken_over = False  # and every one is adopted or ended (its second part)
        self._recovering = False
        self._in_flight = set()
        self._announced_stopping = False
        self._unsubscribe = None
        self._unsubscribe_health = None
        self._unsubscribe_connected = None
        self._relist = LoopingCall(self._guarded, self.reconcile)
        self._relist.clock = reactor
        self._idle = LoopingCall(self._guarded, self.expire_idle)
        self._idle.clock = reactor

    # -- service -------------------------------------------------------------------------

    def startService(self):
        super().startService()
        if self.thread_pool is not None:
            self.thread_pool.start()
        self.journal.open()
        self._unsubscribe = self.docker.subscribe(self._docker_event)
        self._relist.start(RELIST_INTERVAL, now=False)
        self._idle.start(IDLE_CHECK_INTERVAL, now=False)
        self.journal.append("agent-started", data={"agent_id": self.config.agent_id})
        self._unsubscribe_health = self.docker.subscribe(lambda event: self._maybe_recover())
        self._unsubscribe_connected = self.docker.on_connected(self._docker_connected)
        self._maybe_recover()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        for loop in (self._relist, self._idle):
            if loop.running:
                loop.stop()
        for unsubscribe in (self._unsubscribe, self._unsubscribe_health, self._unsubscribe_connected):
            if unsubscribe is not None:
                unsubscribe()
        self._unsubscribe = self._unsubscribe_health = self._unsubscribe_connected = None
        for kernel in self.kernels.values():
            # A runner being reached (the take-over, a broken link) is not waited for: the
            # kernel lives on, and the next run takes it over.
            if kernel.reconnecting is not None:
                kernel.reconnecting.cancel()
        if self._in_flight:
            yield DeferredList(list(self._in_flight), consumeErrors=True)
        self.announce_stopping()
        for kernel in self.kernels.values():
            if kernel.link is not None:
                kernel.link.close("agent stopping")
        self.journal.close()
        if self.thread_pool is not None and self.thread_pool.started:
            self.thread_pool.stop()

    def announce_stopping(self):
        """Journal ``agent-stopping`` (once per run): the last event of this run."""
        if not self._announced_stopping:
            self._announced_stopping = True
            self.journal.append("agent-stopping", data={"agent_id": self.config.agent_id})

    def _track(self, d):
        self._in_flight.add(d)

        def forget(result):
            self._in_flight.discard(d)
            return result

        return d.addBoth(forget)

    def _guarded(self, function):
        """Periodic work never dies on one exception."""
        d = maybeDeferred(function)
        d.addErrback(lambda failure: self.log.failure("periodic {name} failed", failure, name=function.__name__))
        return None

    # -- queries -------------------------------------------------------------------------

    def get(self, kernel_id) -> Kernel:
        check_kernel_id(kernel_id)
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.status == states.TERMINATED:
            if not self.recovered:
                # It may be a kernel of the last run, not found yet: never a false "gone".
                raise errors.BackendUnavailable(TAKING_OVER)
            raise errors.KernelNotFound(f"no kernel {kernel_id!r} on this agent")
        return kernel

    def touch(self, kernel_id) -> Kernel:
        """Look a kernel up for a command on it, which counts as use for the idle timeout."""
        kernel = self.get(kernel_id)
        kernel.last_used = self.reactor.seconds()
        return kernel

    def _used(self, kernel):
        kernel.last_used = self.reactor.seconds()

    def session(self, kernel_id):
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

    # -- files (disk work in the thread pool, on the host side of /home/work) -------------

    def upload(self, kernel_id, path, data, append):
        kernel = self.touch(kernel_id)
        home = self.workspace(kernel.kernel_id).scratch_dir
        return self.run_blocking(files.upload, home, path, data, append, self.config.max_upload_size)

    def download(self, kernel_id, path, offset, length):
        kernel = self.touch(kernel_id)
        home = self.workspace(kernel.kernel_id).scratch_dir
        return self.run_blocking(files.download, home, path, offset, length)

    def list_files(self, kernel_id, path):
        kernel = self.touch(kernel_id)
        home = self.workspace(kernel.kernel_id).scratch_dir
        return self.run_blocking(files.list_files, home, path)

    @inlineCallbacks
    def logs(self, kernel_id, tail=None):
        """The container's output (the runner's own log), from the Engine API."""
        kernel = self.touch(kernel_id)
        if tail is not None and (tail < 0 or tail > 1_000_000):
            raise errors.InvalidRequest(f"tail must be between 0 and 1000000 lines, got {tail}")
        if kernel.container_id is None:
            return ""
        try:
            text = yield self.backend.container_logs(kernel.container_id, tail=tail)
        except DockerNotFound:
            raise errors.KernelNotFound(f"kernel {kernel_id!r} has no container any more")
        except DockerError as e:
            raise errors.BackendUnavailable(f"could not read the logs of kernel {kernel_id}: {e}")
        return text

    def stats_targets(self) -> list:
        """The kernels the statistics collector samples: those with a running container."""
        return [
            self._stats_target(kernel)
            for kernel in self.kernels.values()
            if kernel.status == states.RUNNING and kernel.container_id is not None
        ]

    @inlineCallbacks
    def kernel_stats(self, kernel_id) -> dict:
        """The latest statistics sample of a kernel (a fresh one if it has none yet)."""
        kernel = self.get(kernel_id)
        if self.stats is None:
            raise errors.BackendUnavailable("this agent collects no statistics")
        latest = self.stats.latest(kernel_id)
        if latest is None and kernel.status == states.RUNNING and kernel.container_id is not None:
            latest = yield self.stats.sample_kernel(self._stats_target(kernel))
        return latest if latest is not None else empty_sample(self.reactor.seconds())

    def _stats_target(self, kernel):
        return KernelTarget(kernel.kernel_id, kernel.container_id, self.workspace(kernel.kernel_id).scratch_dir)

    @inlineCallbacks
    def _sample_before_stop(self, kernel):
        """The last sample, taken while the container still runs: it goes into the answer and the event."""
        if self.stats is None or kernel.container_id is None:
            return
        kernel.last_stats = yield self.stats.sample_kernel(self._stats_target(kernel))

    def _last_sample(self, kernel):
        """After the container ended: the latest sample there is; the collector forgets the kernel."""
        if self.stats is not None:
            latest = self.stats.latest(kernel.kernel_id)
            if latest is not None:
                kernel.last_stats = latest
            self.stats.forget(kernel.kernel_id)

    def list_records(self) -> list:
        """``ListKernels``: every kernel, or ``BackendUnavailable`` while some may still be unknown."""
        if not self.recovered:
            raise errors.BackendUnavailable(TAKING_OVER)
        return self.records()

    def records(self) -> list:
        """The kernels known now (for the page and the record; ``list_records`` for managers)."""
        return [kernel.record() for kernel in sorted(self.kernels.values(), key=lambda k: k.created_at)]

    def count(self) -> int:
        return len(self.kernels)

    # -- create --------------------------------------------------------------------------

    def create(self, kernel_id, image, resources, environ=None, mounts=None, idle_timeout=None, exec_timeout=None):
        """Validate, reserve the id, then start the kernel; fires with its record."""
        if not self.running:
            raise errors.BackendUnavailable("the agent is stopping")
        if not self.recovered:
            raise errors.BackendUnavailable(TAKING_OVER)
        check_kernel_id(kernel_id)
        if not isinstance(image, str) or not image:
            raise errors.InvalidRequest("image must be a non-empty name")
        environ = check_environ(environ)
        mounts = resolve_mounts(mounts, self.config.allowed_mount_roots)
        tunables = self.cluster_config()
        idle_timeout = check_timeout("idle_timeout", idle_timeout, tunables.get("idle_timeout", 0))
        exec_timeout = check_timeout("exec_timeout", exec_timeout, tunables.get("exec_timeout", 0))
        request = parse_resource_request(resources, self.allocator.capacity, self.config.default_scratch_size)
        if kernel_id in self.kernels:
            raise errors.KernelExists(f"kernel {kernel_id!r} exists ({self.kernels[kernel_id].status})")
        if not self.docker.healthy:
            raise errors.BackendUnavailable(f"Docker is unreachable: {self.docker.last_error}")
        kernel_image = self.find_image(image)
        if kernel_image.min_mem and request.mem < kernel_image.min_mem:
            raise errors.InvalidRequest(
                f"image {image} needs at least {kernel_image.min_mem} bytes of memory, asked for {request.mem}"
            )
        grant = self.allocator.allocate(kernel_id, request)  # InsufficientResources escapes as is
        now = self.reactor.seconds()
        kernel = Kernel(
            kernel_id=kernel_id,
            image=kernel_image,
            grant=grant,
            environ=environ,
            mounts=mounts,
            idle_timeout=idle_timeout,
            exec_timeout=exec_timeout,
            created_at=now,
            last_used=now,
        )
        self.kernels[kernel_id] = kernel
        return self._track(kernel.lock.run(self._create, kernel))

    def find_image(self, name):
        for kernel_image in self.docker.images:
            if kernel_image.name == name:
                return kernel_image
        raise errors.ImageNotFound(f"no local kernel image {name!r} (labelled ai.backend.kernelspec=1)")

    @inlineCallbacks
    def _create(self, kernel):
        started = time.monotonic()
        self.journal.append("kernel-creating", kernel.kernel_id, {"image": kernel.image.name})
        workspace = self.workspace(kernel.kernel_id)
        steps = {}
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
            yield self._finish(kernel, "creation-failed")
            if isinstance(e, (DockerUnavailable,)):
                raise errors.BackendUnavailable(f"Docker is unreachable: {e}")
            if isinstance(e, errors.AgentError):
                failure.raiseException()
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} could not be started: {_describe(e)}")
        if kernel.status != states.CREATING:
            # Died (or was reset) while its runner was being reached: _finish has run.
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} ended while starting")
        kernel.status = states.RUNNING
        self.journal.append("kernel-started", kernel.kernel_id, kernel.record())
        self.log.info(
            "kernel {kernel_id} started in {elapsed:.3f}s ({steps})",
            kernel_id=kernel.kernel_id,
            elapsed=time.monotonic() - started,
            steps=", ".join(f"{step} at {at * 1000:.0f} ms" for step, at in steps.items()),
        )
        return kernel.record()

    @inlineCallbacks
    def _start_container(self, kernel, workspace, steps=None, limiting=None):
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
            kernel.container_id = yield self.backend.create_container(
                container_name(self.config.agent_id, kernel.kernel_id), body
            )
            steps["created"] = time.monotonic() - started
            yield self.run_blocking(workspace.save, kernel.saved_state())
            yield self.run_blocking(workspace.write_environ, user_environment(kernel))
            steps["saved"] = time.monotonic() - started
            if limiting is not None:
                limiting, waiting = None, limiting
                yield waiting
                steps["home limited"] = time.monotonic() - started
            yield self.backend.start_container(kernel.container_id)
            steps["docker started"] = time.monotonic() - started
        finally:
            if limiting is not None:
                yield DeferredList([limiting], consumeErrors=True)
            if binds:
                yield self.run_blocking(pinned_mounts.unpin, workspace.state_dir)
        link = yield self.connect_runner(self.reactor, workspace.socket_path, self.reactor, RUNNER_START_TIMEOUT)
        steps["runner answered"] = time.monotonic() - started
        self._attach(kernel, link)

    def _attach(self, kernel, link):
        kernel.link = link
        kernel.session = ExecutionSession(
            kernel.kernel_id, link, self.reactor, kernel.exec_timeout, on_activity=lambda: self._used(kernel)
        )
        link.dead.addCallback(lambda reason: self._runner_lost(kernel, link, reason))

    def workspace(self, kernel_id) -> Workspace:
        return Workspace(self.config.scratch_root, self.config.state_dir, kernel_id, self.scratch_volumes)

    # -- destroy, restart, reset ---------------------------------------------------------

    def destroy(self, kernel_id, reason="user-requested"):
        """Destroy a kernel; fires with ``{kernel_id, exit_code, stats}``."""
        kernel = self.get(kernel_id)
        if reason not in DESTROY_REASONS:
            raise errors.InvalidRequest(f"reason must be one of {', '.join(DESTROY_REASONS)}; got {reason!r}")
        return self._destroy_kernel(kernel, reason)

    def _destroy_kernel(self, kernel, reason):
        if kernel.terminated is not None:
            # A destroy (or a death) is already under way: share its answer.
            return _share(kernel.terminated)
        terminated = kernel.terminated = Deferred()

        def retry_later(failure):
            # Docker was away: the kernel is as it was, and a later destroy tries again.
            kernel.terminated = None
            return failure

        d = self._track(kernel.lock.run(self._destroy, kernel, reason))
        d.addErrback(retry_later)
        d.addBoth(_pass_to, terminated)
        return _share(terminated)

    @inlineCallbacks
    def _destroy(self, kernel, reason):
        if kernel.status == states.TERMINATED:
            return self._answer(kernel)
        if kernel.container_id is not None:
            yield self._sample_before_stop(kernel)
            try:
                yield self.backend.stop_container(kernel.container_id, timeout=STOP_GRACE)
                state = yield self.backend.inspect_container(kernel.container_id)
                kernel.exit_code = state.get("State", {}).get("ExitCode")
            except DockerNotFound:
                pass
            except DockerError as e:
                raise errors.BackendUnavailable(f"could not stop kernel {kernel.kernel_id}: {e}")
        kernel.status = states.TERMINATING
        if kernel.link is not None:
            kernel.link.close("kernel destroyed")
        yield self._finish(kernel, reason)
        return self._answer(kernel)

    def _answer(self, kernel):
        answer = {"kernel_id": kernel.kernel_id, "stats": dict(kernel.last_stats)}
        if kernel.exit_code is not None:
            answer["exit_code"] = kernel.exit_code
        return answer

    def restart(self, kernel_id):
        kernel = self.touch(kernel_id)
        if kernel.terminated is not None:
            raise errors.KernelNotFound(f"kernel {kernel_id!r} is being destroyed")
        return self._track(kernel.lock.run(self._restart, kernel))

    @inlineCallbacks
    def _restart(self, kernel):
        if kernel.status != states.RUNNING:
            raise errors.KernelNotFound(f"kernel {kernel.kernel_id!r} is {kernel.status}")
        kernel.status = states.RESTARTING
        if kernel.link is not None:
            kernel.link.close("kernel restarting")
            kernel.link = None
            kernel.session = None
        workspace = self.workspace(kernel.kernel_id)
        old_container = kernel.container_id
        exit_code = None
        try:
            yield self._sample_before_stop(kernel)
            try:
                yield self.backend.stop_container(old_container, timeout=STOP_GRACE)
                state = yield self.backend.inspect_container(old_container)
                exit_code = state.get("State", {}).get("ExitCode")
                yield self.backend.remove_container(old_container, force=True)
            except DockerNotFound:
                pass
            kernel.container_id = None
            self._last_sample(kernel)
            self.journal.append(
                "kernel-terminated",
                kernel.kernel_id,
                {"reason": "restarting", "exit_code": exit_code, "stats": dict(kernel.last_stats)},
            )
            yield self.run_blocking(workspace.clear_run_dir)
            yield self._start_container(kernel, workspace)
        except Exception as e:
            self.log.warn(
                "kernel {kernel_id} could not restart: {error}", kernel_id=kernel.kernel_id, error=_describe(e)
            )
            yield self._finish(kernel, "creation-failed")
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} could not be restarted: {_describe(e)}")
        if kernel.status != states.RESTARTING:
            raise errors.KernelCreationFailed(f"kernel {kernel.kernel_id} ended while restarting")
        kernel.status = states.RUNNING
        kernel.exit_code = None
        self.journal.append("kernel-restarted", kernel.kernel_id, kernel.record())
        return kernel.record()

    def reset(self):
        """Destroy every kernel (reason ``agent-reset``); fires with how many."""
        return self.destroy_all("agent-reset")

    @inlineCallbacks
    def destroy_all(self, reason):
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

    # -- death -----------------------------------------------------------------------------

    def _docker_event(self, event):
        if event.get("Type") != "container":
            return
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if attributes.get(AGENT_ID_LABEL) != self.config.agent_id:
            return
        kernel = self.kernels.get(attributes.get(KERNEL_ID_LABEL))
        container_id = (event.get("Actor") or {}).get("ID") or event.get("id")
        if kernel is None or container_id != kernel.container_id:
            return
        action = event.get("Action") or event.get("status")
        if action == "oom":
            kernel.oom_killed = True
        elif action == "kill":
            kernel.kill_seen = True  # someone asked Docker to signal it: not the OOM killer
        elif action == "die":
            exit_code = _int_or_none(attributes.get("exitCode"))
            self._died(kernel, exit_code)

    def _died(self, kernel, exit_code):
        """The container of a kernel ended without the agent asking."""
        if kernel.status not in (states.RUNNING, states.CREATING) or kernel.terminated is not None:
            return
        kernel.terminated = Deferred()
        kernel.exit_code = exit_code
        d = self._track(kernel.lock.run(self._reap, kernel))
        d.addBoth(_pass_to, kernel.terminated)

    @inlineCallbacks
    def _reap(self, kernel):
        if kernel.status == states.TERMINATED:
            return self._answer(kernel)
        kernel.status = states.TERMINATING
        if kernel.link is not None:
            kernel.link.close("container died")
        try:
            state = (yield self.backend.inspect_container(kernel.container_id)).get("State", {})
            kernel.oom_killed = kernel.oom_killed or bool(state.get("OOMKilled"))
            if kernel.exit_code is None:
                kernel.exit_code = state.get("ExitCode")
        except DockerNotFound:
            pass
        except DockerError as e:
            self.log.warn("could not inspect dead kernel {kernel_id}: {error}", kernel_id=kernel.kernel_id, error=e)
        # Docker 20.10 on cgroup v1 sometimes reports an OOM kill late (the ``oom`` event
        # after ``die``) or not at all when several happen at once. The runner runs as
        # root, so user code cannot SIGKILL it; the agent did not (this is not a destroy)
        # and nobody asked Docker to (no ``kill`` event): a SIGKILL exit (137) is then the
        # kernel's OOM killer.
        oom = kernel.oom_killed or (kernel.exit_code == 137 and not kernel.kill_seen)
        reason = "oom-killed" if oom else "self-terminated"
        self.log.info(
            "kernel {kernel_id} ended by itself ({reason}, exit code {exit_code})",
            kernel_id=kernel.kernel_id,
            reason=reason,
            exit_code=kernel.exit_code,
        )
        yield self._finish(kernel, reason)
        return self._answer(kernel)

    def _runner_lost(self, kernel, link, reason):
        """A runner link died: if the container died too, Docker tells us; check now."""
        if kernel.link is link and kernel.status == states.RUNNING and kernel.terminated is None and self.running:
            # (When the agent stops, it closes the links itself: the kernels live on.)
            self.log.warn("lost the runner of kernel {kernel_id}: {reason}", kernel_id=kernel.kernel_id, reason=reason)
            kernel.link = None
            kernel.session = None
            self._track(self._check_container(kernel))

    @inlineCallbacks
    def _check_container(self, kernel):
        try:
            state = (yield self.backend.inspect_container(kernel.container_id)).get("State", {})
        except DockerNotFound:
            self._died(kernel, None)
            return
        if not state.get("Running"):
            self._died(kernel, state.get("ExitCode"))
            return
        # The container lives: the link broke (a keepalive missed, say).
        if kernel.status != states.RUNNING or kernel.terminated is not None:
            return
        if (yield self._reach_runner(kernel)) is not None:
            self.log.info("kernel {kernel_id}: runner reconnected", kernel_id=kernel.kernel_id)

    @inlineCallbacks
    def _reach_runner(self, kernel):
        """
        Connect again to the runner of a running kernel and attach the link; fires with it,
        or with None. A runner that stays silent is as good as dead: the kernel is ended
        (``self-terminated``). The attempt is cancelled if the kernel ends meanwhile
        (``_finish``) or the agent stops: a later kernel of the same id has the same
        socket path, and a runner takes the newest connection.
        """
        kernel.reconnecting = self.connect_runner(
            self.reactor, self.workspace(kernel.kernel_id).socket_path, self.reactor, RUNNER_START_TIMEOUT
        )
        try:
            link = yield kernel.reconnecting
        except CancelledError:
            return None
        except Exception as e:
            self.log.error(
                "kernel {kernel_id}: its runner does not answer ({error}); ending it",
                kernel_id=kernel.kernel_id,
                error=e,
            )
            self._died(kernel, None)  # reported self-terminated; _finish removes the container
            return None
        finally:
            kernel.reconnecting = None
        if kernel.status != states.RUNNING or kernel.link is not None:
            link.close("the kernel moved on meanwhile")
            return None
        self._attach(kernel, link)
        return link

    def _docker_connected(self):
        """Docker answers again (after an outage, say): look at once for what happened meanwhile."""
        if self.recovered:
            self._guarded(self.reconcile)
        else:
            self._maybe_recover()

    @inlineCallbacks
    def reconcile(self):
        """
        Re-list our containers: a kernel whose container is gone or stopped has died; a
        container of ours that no kernel owns (its removal failed while Docker was away)
        is removed.
        """
        if not self.docker.healthy:
            return
        if not self.recovered:
            yield self._maybe_recover()
            return
        containers = yield self.backend.list_containers(labels={AGENT_ID_LABEL: self.config.agent_id}, all=True)
        running = {container["Id"]: container for container in containers}
        for container in containers:
            kernel_id = (container.get("Labels") or {}).get(KERNEL_ID_LABEL)
            if kernel_id and kernel_id not in self.kernels:
                self._track(self._remove_stray(kernel_id, container["Id"]))
        for kernel in list(self.kernels.values()):
            if kernel.status != states.RUNNING or kernel.container_id is None:
                continue
            container = running.get(kernel.container_id)
            if container is None:
                self._died(kernel, None)
            elif container.get("State") != "running":
                self._track(self._check_container(kernel))

    @inlineCallbacks
    def _remove_stray(self, kernel_id, container_id):
        if kernel_id in self.kernels:
            return  # a new kernel of that id owns its own container; this one is older
        self.log.warn(
            "removing container {container} of ended kernel {kernel_id}",
            container=container_id[:12],
            kernel_id=kernel_id,
        )
        try:
            yield self.backend.remove_container(container_id, force=True)
        except DockerNotFound:
            pass

    def expire_idle(self):
        self._maybe_recover()  # Docker may have become reachable since the last look
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
                self.destroy(kernel.kernel_id, "idle-timeout").addErrback(
                    lambda failure: self.log.failure("idle destroy failed", failure)
                )

    # -- taking over after a restart -------------------------------------------------------

    def _maybe_recover(self):
        """Recover once Docker answers (at start, or on its first event, or at a re-list)."""
        if self.recovered or self._recovering or not self.docker.healthy or not self.running:
            return None
        # Set before starting: recovery causes Docker events, which call this again.
        self._recovering = True

        def done(result):
            self._recovering = False
            return result

        def failed(failure):
            self.log.failure("taking over the kernels of the last run failed; retrying at the next re-list", failure)

        return self._track(maybeDeferred(self.recover)).addBoth(done).addErrback(failed)

    @inlineCallbacks
    def recover(self):
        """
        Take over what a previous run of this agent left: its containers (found by their
        labels; never another agent's, never one without kernel labels), their saved
        state under the state dir, and their homes. Running kernels are adopted (grant
        restored, runner reconnected); kernels that died meanwhile are reported
        ``self-terminated`` with their exit code; what an interrupted create left behind
        is removed and reported ``orphan-cleanup``.

        It runs in two parts (PROTOCOL.md section 6). The first only reads (one container
        list, the state files, the homes) and registers every kernel it found: the ones
        to adopt as ``running``, the ones to end as ``terminating``. From then on
        (``recovered``) every command answers the truth about every kernel; until then
        kernel commands and ``ListKernels`` answer ``BACKEND_UNAVAILABLE``. The second part
        is the slow one: reconnecting runners (up to ``RUNNER_START_TIMEOUT`` for a silent
        one), stopping and removing containers and homes; each kernel's part holds its
        lock, so that a command on it waits for it. ``taken_over`` tells when it is done.
        """
        containers = yield self.backend.list_containers(labels={AGENT_ID_LABEL: self.config.agent_id}, all=True)
        saved = yield self.run_blocking(load_saved_states, self.config.state_dir)
        homes = yield self.run_blocking(leftover_kernel_ids, self.config.scratch_root)
        # What the last run told managers last about each kernel, read once for all of them.
        last_events = {event.kernel_id: event for event in self.journal.since(0) if event.kernel_id}
        adopting, ending = [], []  # (kernel, last event) and (kernel, reason)
        for container in containers:
            labels = container.get("Labels") or {}
            kernel_id = labels.get(KERNEL_ID_LABEL)
            if labels.get(AGENT_ID_LABEL) != self.config.agent_id or not check_kernel_id_quietly(kernel_id):
                continue
            if kernel_id in self.kernels:
                continue
            state = saved.pop(kernel_id, None)
            homes.discard(kernel_id)
            if state is None or state.get("container_id") != container["Id"]:
                ending.append((self._register_ending(kernel_id, container["Id"]), "orphan-cleanup"))
                continue
            kernel = self._register_adopted(state, container["Id"]) if container.get("State") == "running" else None
            if kernel is not None:
                adopting.append((kernel, last_events.get(kernel_id)))
            else:
                ending.append((self._register_ending(kernel_id, container["Id"]), "self-terminated"))
        for kernel_id, state in saved.items():
            # Saved, but its container is gone: it ended while nobody watched.
            homes.discard(kernel_id)
            if kernel_id not in self.kernels:
                ending.append((self._register_ending(kernel_id, None), "self-terminated"))
        for kernel_id in homes:
            if kernel_id not in self.kernels and check_kernel_id_quietly(kernel_id):
                ending.append((self._register_ending(kernel_id, None), "orphan-cleanup"))
        # State dirs that no kernel explains (a create killed before it saved): removed
        # before any new kernel can be made, so that none of its directories is taken.
        keep = {kernel_key(kernel_id) for kernel_id in self.kernels}
        try:
            yield self.run_blocking(remove_state_dirs_except, self.config.state_dir, keep)
            if self.scratch_volumes is not None:
                homes = [self.workspace(kernel_id).scratch_dir for kernel_id in self.kernels]
                yield self.run_blocking(self.scratch_volumes.remove_images_except, homes)
        except Exception:
            # Registered kernels must get their second part whatever: never fail here.
            self.log.failure("could not remove the state dirs no kernel explains")
        self.recovered = True
        self.log.info(
            "taking over from the last run: {adopting} kernel(s) to adopt, {ending} to end",
            adopting=len(adopting),
            ending=len(ending),
        )
        work = [self._track(kernel.lock.run(self._reconnect_adopted, kernel, last)) for kernel, last in adopting]
        work += [self._track(kernel.lock.run(self._end_found, kernel, reason)) for kernel, reason in ending]
        results = yield DeferredList(work, consumeErrors=True)
        for ok, failure in results:
            if not ok:
                self.log.failure("a part of the take-over failed", failure)
        # Kernels whose runner stayed silent are being ended: that is part of the take-over.
        ending_now = [_share(kernel.terminated) for kernel, _ in adopting if kernel.terminated is not None]
        yield DeferredList(ending_now, consumeErrors=True)
        adopted = sum(1 for kernel, _ in adopting if kernel.status == states.RUNNING)
        self.taken_over = True
        self.log.info(
            "took over from the last run: {adopted} kernel(s) adopted, {ended} ended",
            adopted=adopted,
            ended=len(ending) + len(adopting) - adopted,
        )

    def _register_adopted(self, state, container_id):
        """A running kernel of the last run, registered as ``running`` (its runner is reconnected next)."""
        kernel_id = state["kernel_id"]
        try:
            grant = Grant.from_json(kernel_id, state.get("resources") or {})
            self.allocator.restore(grant)
        except (ValueError, TypeError, errors.AgentError) as e:
            self.log.error("cannot adopt kernel {kernel_id}: {error}", kernel_id=kernel_id, error=e)
            return None
        image = self._saved_image(state)
        try:
            mounts = resolve_mounts(state.get("mounts") or None, self.config.allowed_mount_roots)
        except errors.InvalidRequest:
            mounts = ()
        now = self.reactor.seconds()
        kernel = Kernel(
            kernel_id=kernel_id,
            image=image,
            grant=grant,
            environ=dict(state.get("environ") or {}),
            mounts=mounts,
            idle_timeout=_int_or_none(state.get("idle_timeout")) or 0,
            exec_timeout=_int_or_none(state.get("exec_timeout")) or 0,
            created_at=_float_or(state.get("created_at"), now),
            last_used=now,
            status=states.RUNNING,
            container_id=container_id,
        )
        self.kernels[kernel_id] = kernel
        return kernel

    def _register_ending(self, kernel_id, container_id):
        """A kernel of the last run found only to be ended: ``terminating`` until it is."""
        kernel = _ending_kernel(kernel_id, container_id)
        kernel.terminated = Deferred()
        self.kernels[kernel_id] = kernel
        return kernel

    @inlineCallbacks
    def _reconnect_adopted(self, kernel, last_event):
        if kernel.status != states.RUNNING:
            return  # it died meanwhile, and its death was handled first
        if (yield self._reach_runner(kernel)) is None:
            return  # a silent runner's kernel is being ended (after this, under its lock)
        self._announce_adopted(kernel, last_event)
        self.log.info("adopted kernel {kernel_id}", kernel_id=kernel.kernel_id)

    @inlineCallbacks
    def _end_found(self, kernel, reason):
        """End a kernel the take-over found dead or half-made: exit code, then ``_finish``."""
        if kernel.status == states.TERMINATED:
            return
        if reason == "orphan-cleanup":
            self.log.info("removing what an interrupted create of {kernel_id} left", kernel_id=kernel.kernel_id)
        elif kernel.container_id is not None:
            try:
                state = yield self.backend.inspect_container(kernel.container_id)
                kernel.exit_code = state.get("State", {}).get("ExitCode")
            except DockerError:
                pass
        yield self._finish(kernel, reason)
        kernel.terminated.callback(self._answer(kernel))

    def _announce_adopted(self, kernel, last):
        """
        A kernel adopted after the last run was killed between starting its container and
        journaling that it started (or restarted): managers saw ``kernel-creating`` (or
        ``kernel-terminated`` with reason ``restarting``) and then nothing (``last``, the
        kernel's last event). Finish the story.
        """
        if last is None:
            return
        if last.type == "kernel-creating":
            self.journal.append("kernel-started", kernel.kernel_id, kernel.record())
        elif last.type == "kernel-terminated" and last.data.get("reason") == "restarting":
            self.journal.append("kernel-restarted", kernel.kernel_id, kernel.record())

    def _saved_image(self, state):
        for kernel_image in self.docker.images:
            if kernel_image.name == state.get("image"):
                return kernel_image
        # The image was removed or re-tagged meanwhile: the kernel runs on as it is.
        return KernelImage(name=str(state.get("image")), id=str(state.get("image_id")))

    # -- the end of every kernel -----------------------------------------------------------

    @inlineCallbacks
    def _finish(self, kernel, reason):
        """
        Remove the container and the directories, release the grant, journal the end.
        Runs once per kernel (the caller holds its lock and checked its status).
        """
        if kernel.reconnecting is not None:
            kernel.reconnecting.cancel()
        # By name when the id is unknown: a create whose answer was lost may still have
        # made the container.
        container = kernel.container_id or container_name(self.config.agent_id, kernel.kernel_id)
        if container is not None:
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
        self._last_sample(kernel)
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
            "kernel-terminated",
            kernel.kernel_id,
            {"reason": reason, "exit_code": kernel.exit_code, "stats": dict(kernel.last_stats)},
        )


def _ending_kernel(kernel_id, container_id, exit_code=None):
    """A kernel found at take-over only to be ended: just what ``_finish`` needs (it holds no grant)."""
    return Kernel(
        kernel_id=kernel_id,
        image=KernelImage(name="", id=""),
        grant=Grant(kernel_id=kernel_id, cpu=0.0, mem=0),
        environ={},
        mounts=(),
        idle_timeout=0,
        exec_timeout=0,
        created_at=0.0,
        last_used=0.0,
        status=states.TERMINATING,
        container_id=container_id,
        exit_code=exit_code,
    )


def _share(d):
    """A new Deferred with the result of ``d`` (which stays usable for others)."""
    shared = Deferred()

    def forward(result):
        if isinstance(result, Failure):
            shared.errback(result)
        else:
            shared.callback(result)
        return result

    d.addBoth(forward)
    d.addErrback(lambda failure: None)  # the copies carry the failure; this one is done
    return shared


def _pass_to(result, d):
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or(value, default) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _describe(error) -> str:
    return str(error) or type(error).__name__
