"""
Death detection: kernels that end without the agent asking, found and ended.

A kernel's container can die (its process exits, the OOM killer strikes, someone removes
it), and its runner link can break. The agent learns it three ways, since any one can be
missed: Docker's ``die``/``oom``/``kill`` events (``docker_event``), a link's ``dead``
(``attach`` watches every link it hands a kernel), and the re-list every few seconds
(``relist``), which also removes containers of ours that no kernel owns. A dead kernel is
reaped under its lock: ``oom-killed`` or ``self-terminated``, then ``end`` (the registry's
``_finish``).

A link can break while its container lives (a missed keepalive): the runner is then reached
again (``reach_runner``, also what the take-over uses for adopted kernels), and a runner
that stays silent is as good as dead.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.logger import Logger

from bai_agent.docker.interface import DockerError, DockerNotFound, IDockerBackend
from bai_agent.kernels import kernel as states
from bai_agent.kernels.deferreds import pass_to
from bai_agent.kernels.execution import ExecutionSession
from bai_agent.kernels.kernel import Kernel
from bai_agent.kernels.runner_link import RunnerLink
from bai_agent.protocol import events
from bai_agent.protocol.labels import AGENT_ID_LABEL, KERNEL_ID_LABEL
from bai_agent.runtime.inflight import InFlight
from bai_agent.services.kernel_services import is_service_message

RUNNER_START_TIMEOUT = 30.0
# The exit code of a SIGKILL: with no ``kill`` event, the kernel's OOM killer (see _reap).
SIGKILL_EXIT = 137

ConnectRunner = Callable[[Any, str, Any, float], "Deferred[RunnerLink]"]


class DeathWatch:
    """
    :param reactor: the reactor (timers, and the runner connector's ``IReactorUNIX``).
    :param agent_id: this agent's id: only containers labelled with it are ours.
    :param backend: the ``IDockerBackend``.
    :param kernels: the registry's kernels by id (read; ``end`` removes the ended).
    :param in_flight: the registry's work in flight, which its stop waits for.
    :param connect_runner: ``(reactor, socket_path, clock, timeout) -> Deferred[RunnerLink]``.
    :param socket_path: the runner socket of a kernel, by kernel id.
    :param end: ``(kernel, reason) -> Deferred``, the end of every kernel (under its lock).
    :param is_running: whether the registry runs (when it stops, it closes the links itself).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        agent_id: str,
        backend: IDockerBackend,
        kernels: dict[str, Kernel],
        in_flight: InFlight,
        connect_runner: ConnectRunner,
        socket_path: Callable[[str], str],
        end: Callable[[Kernel, str], Deferred[None]],
        is_running: Callable[[], bool],
        service_message: Callable[[Kernel, dict[str, Any]], None],
    ) -> None:
        self.reactor = reactor
        self.agent_id = agent_id
        self.backend = backend
        self.kernels = kernels
        self.in_flight = in_flight
        self.connect_runner = connect_runner
        self.socket_path = socket_path
        self.end = end
        self.is_running = is_running
        self.service_message = service_message  # a runner's messages about services go there

    # -- Docker events ---------------------------------------------------------------------

    def docker_event(self, event: dict[str, Any]) -> None:
        if event.get("Type") != "container":
            return
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if attributes.get(AGENT_ID_LABEL) != self.agent_id:
            return
        kernel_id = attributes.get(KERNEL_ID_LABEL)
        kernel = self.kernels.get(kernel_id) if isinstance(kernel_id, str) else None
        container_id = (event.get("Actor") or {}).get("ID") or event.get("id")
        if kernel is None and container_id:
            # A warm kernel's container was made for the pool: it has no kernel-id label.
            kernel = next((k for k in self.kernels.values() if k.warm and k.container_id == container_id), None)
        if kernel is None or container_id != kernel.container_id:
            return
        action = event.get("Action") or event.get("status")
        if action == "oom":
            kernel.oom_killed = True
        elif action == "kill":
            kernel.kill_seen = True  # someone asked Docker to signal it: not the OOM killer
        elif action == "die":
            self.died(kernel, int_or_none(attributes.get("exitCode")))

    # -- the end of a dead kernel ------------------------------------------------------------

    def died(self, kernel: Kernel, exit_code: int | None) -> None:
        """The container of a kernel ended without the agent asking."""
        if kernel.status not in (states.RUNNING, states.CREATING) or kernel.terminated is not None:
            return
        terminated = kernel.terminated = Deferred()
        kernel.exit_code = exit_code
        d = self.in_flight.track(kernel.lock.run(self._reap, kernel))
        d.addBoth(pass_to, terminated)

    @inlineCallbacks
    def _reap(self, kernel: Kernel) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        if kernel.status == states.TERMINATED:
            return kernel.answer()
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
        oom = kernel.oom_killed or (kernel.exit_code == SIGKILL_EXIT and not kernel.kill_seen)
        reason = events.OOM_KILLED if oom else events.SELF_TERMINATED
        self.log.info(
            "kernel {kernel_id} ended by itself ({reason}, exit code {exit_code})",
            kernel_id=kernel.kernel_id,
            reason=reason,
            exit_code=kernel.exit_code,
        )
        yield self.end(kernel, reason)
        return kernel.answer()

    # -- runner links ------------------------------------------------------------------------

    def attach(self, kernel: Kernel, link: RunnerLink) -> None:
        """Give a kernel its runner link and the session over it, and watch the link for its loss."""
        kernel.link = link
        kernel.session = ExecutionSession(
            kernel.kernel_id, link, self.reactor, kernel.exec_timeout, on_activity=lambda: self._used(kernel)
        )
        session = kernel.session
        services = self.service_message

        def route(message: dict) -> None:
            if is_service_message(message):
                services(kernel, message)
            else:
                session.handle(message)

        link.handler = route
        link.dead.addCallback(lambda reason: self._runner_lost(kernel, link, reason))

    def _used(self, kernel: Kernel) -> None:
        kernel.last_used = self.reactor.seconds()

    def _runner_lost(self, kernel: Kernel, link: RunnerLink, reason: object) -> None:
        """A runner link died: if the container died too, Docker tells us; check now."""
        if kernel.link is link and kernel.status == states.RUNNING and kernel.terminated is None and self.is_running():
            # (When the agent stops, it closes the links itself: the kernels live on.)
            self.log.warn("lost the runner of kernel {kernel_id}: {reason}", kernel_id=kernel.kernel_id, reason=reason)
            kernel.link = None
            kernel.session = None
            self.in_flight.track(self._check_container(kernel))

    @inlineCallbacks
    def _check_container(self, kernel: Kernel) -> Generator[Deferred[Any], Any, None]:
        try:
            state = (yield self.backend.inspect_container(kernel.container_id)).get("State", {})
        except DockerNotFound:
            self.died(kernel, None)
            return
        if not state.get("Running"):
            self.died(kernel, state.get("ExitCode"))
            return
        # The container lives: the link broke (a keepalive missed, say).
        if kernel.status != states.RUNNING or kernel.terminated is not None:
            return
        if (yield self.reach_runner(kernel)) is not None:
            self.log.info("kernel {kernel_id}: runner reconnected", kernel_id=kernel.kernel_id)

    @inlineCallbacks
    def reach_runner(self, kernel: Kernel) -> Generator[Deferred[Any], Any, RunnerLink | None]:
        """
        Connect again to the runner of a running kernel and attach the link; fires with it,
        or with None. A runner that stays silent is as good as dead: the kernel is ended
        (``self-terminated``). The attempt is cancelled if the kernel ends meanwhile
        (``_finish``) or the agent stops: a later kernel of the same id has the same
        socket path, and a runner takes the newest connection.
        """
        reconnecting = kernel.reconnecting = self.connect_runner(
            self.reactor, self.socket_path(kernel.kernel_id), self.reactor, RUNNER_START_TIMEOUT
        )
        try:
            link: RunnerLink = yield reconnecting
        except CancelledError:
            return None
        except Exception as e:
            self.log.error(
                "kernel {kernel_id}: its runner does not answer ({error}); ending it",
                kernel_id=kernel.kernel_id,
                error=e,
            )
            self.died(kernel, None)  # reported self-terminated; _finish removes the container
            return None
        finally:
            kernel.reconnecting = None
        if kernel.status != states.RUNNING or kernel.link is not None:
            link.close("the kernel moved on meanwhile")
            return None
        self.attach(kernel, link)
        return link

    # -- the re-list -------------------------------------------------------------------------

    @inlineCallbacks
    def relist(self) -> Generator[Deferred[Any], Any, None]:
        """
        Re-list our containers: a kernel whose container is gone or stopped has died; a
        container of ours that no kernel owns (its removal failed while Docker was away)
        is removed.
        """
        containers = yield self.backend.list_containers(labels={AGENT_ID_LABEL: self.agent_id}, all=True)
        running = {container["Id"]: container for container in containers}
        for container in containers:
            kernel_id = (container.get("Labels") or {}).get(KERNEL_ID_LABEL)
            if kernel_id and kernel_id not in self.kernels:
                self.in_flight.track(self._remove_stray(kernel_id, container["Id"]))
        for kernel in list(self.kernels.values()):
            if kernel.status != states.RUNNING or kernel.container_id is None:
                continue
            container = running.get(kernel.container_id)
            if container is None:
                self.died(kernel, None)
            elif container.get("State") != "running":
                self.in_flight.track(self._check_container(kernel))

    @inlineCallbacks
    def _remove_stray(self, kernel_id: str, container_id: str) -> Generator[Deferred[Any], Any, None]:
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


def int_or_none(value: Any) -> int | None:
    """An exit code (or a saved number) as Docker or a state file gave it; None if it is none."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
