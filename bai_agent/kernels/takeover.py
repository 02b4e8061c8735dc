"""
The take-over: what a previous run of this agent left, found and adopted or ended.

Its containers are found by their labels (never another agent's, never one without kernel
labels), with their saved state under the state dir and their homes. Running kernels are
adopted (grant restored, runner reconnected, services relayed again on their host ports);
kernels that died meanwhile are reported
``self-terminated`` with their exit code; what an interrupted create left behind is removed
and reported ``orphan-cleanup``.

It runs in two parts (PROTOCOL.md section 6). The first only reads (one container list, the
state files, the homes) and registers every kernel it found: the ones to adopt as
``running``, the ones to end as ``terminating``. From then on (``recovered``) every command
answers the truth about every kernel; until then kernel commands and ``ListKernels`` answer
``BACKEND_UNAVAILABLE``. The second part is the slow one: reconnecting runners (up to
``RUNNER_START_TIMEOUT`` for a silent one), stopping and removing containers and homes; each
kernel's part holds its lock, so that a command on it waits for it. ``taken_over`` tells
when it is done.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from bai_agent.docker.images import KernelImage
from bai_agent.docker.interface import DockerError, IDockerBackend
from bai_agent.kernels import kernel as states
from bai_agent.kernels.allocator import Allocator, Grant
from bai_agent.kernels.container import container_name
from bai_agent.kernels.deaths import DeathWatch, int_or_none
from bai_agent.kernels.deferreds import share
from bai_agent.kernels.journal import AgentEvent, EventJournal
from bai_agent.kernels.kernel import Kernel
from bai_agent.kernels.spec import check_kernel_id_quietly, resolve_mounts
from bai_agent.kernels.workspace import (
    PoolWorkspace,
    Workspace,
    finish_claims,
    kernel_key,
    leftover_kernel_ids,
    load_pool_states,
    load_saved_states,
    remove_state_dirs_except,
    valid_pool_id,
)
from bai_agent.protocol import errors, events
from bai_agent.protocol.labels import AGENT_ID_LABEL, KERNEL_ID_LABEL, POOL_ID_LABEL, POOL_LABEL
from bai_agent.runtime.inflight import InFlight

if TYPE_CHECKING:
    from bai_agent.config import AgentConfig
    from bai_agent.docker.service import DockerService
    from bai_agent.kernels.warm_pool import WarmPool
    from bai_agent.services.kernel_services import KernelServices


class TakeOver:
    """
    :param clock: ``IReactorTime``: the adopted kernels' ``last_used``.
    :param config: the ``AgentConfig`` (agent id, state dir, scratch root, mount roots).
    :param docker: the ``DockerService`` (health, images).
    :param backend: the ``IDockerBackend``.
    :param journal: the ``EventJournal``, read for what the last run told managers.
    :param allocator: the ``Allocator`` the adopted kernels' grants are restored into.
    :param kernels: the registry's kernels by id, which the take-over registers into.
    :param in_flight: the registry's work in flight, which its stop waits for.
    :param run_blocking: ``(f, *args) -> Deferred``, off the reactor thread.
    :param workspace: a kernel's ``Workspace``, by kernel id.
    :param scratch_volumes: the ``ScratchVolumes`` of the homes, or None.
    :param deaths: the registry's ``DeathWatch`` (reaching runners, ending silent ones).
    :param services: the registry's ``KernelServices`` (the adopted kernels' services).
    :param pool: the registry's ``WarmPool``: the last run's pool containers go back into
        it, claims it was killed in the middle of are finished; it starts filling after.
    :param end: ``(kernel, reason) -> Deferred``, the end of every kernel (under its lock).
    :param is_running: whether the registry runs.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        config: AgentConfig,
        docker: DockerService,
        backend: IDockerBackend,
        journal: EventJournal,
        allocator: Allocator,
        kernels: dict[str, Kernel],
        in_flight: InFlight,
        run_blocking: Callable[..., Deferred[Any]],
        workspace: Callable[[str], Workspace],
        scratch_volumes: Any,
        deaths: DeathWatch,
        services: KernelServices,
        pool: WarmPool,
        end: Callable[[Kernel, str], Deferred[None]],
        is_running: Callable[[], bool],
    ) -> None:
        self.clock = clock
        self.config = config
        self.docker = docker
        self.backend = backend
        self.journal = journal
        self.allocator = allocator
        self.kernels = kernels
        self.in_flight = in_flight
        self.run_blocking = run_blocking
        self.workspace = workspace
        self.scratch_volumes = scratch_volumes
        self.deaths = deaths
        self.services = services
        self.pool = pool
        self.end = end
        self.is_running = is_running
        self.recovered = False  # every kernel of the last run is known (the first part)
        self.taken_over = False  # and every one is adopted or ended (the second part)
        self._recovering = False

    def maybe_recover(self) -> Deferred[Any] | None:
        """Recover once Docker answers (at start, or on its first event, or at a re-list)."""
        if self.recovered or self._recovering or not self.docker.healthy or not self.is_running():
            return None
        # Set before starting: recovery causes Docker events, which call this again.
        self._recovering = True

        def done(result: Any) -> Any:
            self._recovering = False
            return result

        def failed(failure: Any) -> None:
            self.log.failure("taking over the kernels of the last run failed; retrying at the next re-list", failure)

        return self.in_flight.track(maybeDeferred(self.recover)).addBoth(done).addErrback(failed)

    @inlineCallbacks
    def recover(self) -> Generator[Deferred[Any], Any, None]:
        """Both parts of the take-over (see the module's docstring)."""
        agent_id = self.config.agent_id
        # It starts as soon as Docker answers, before Docker's images were first listed:
        # an adopted kernel needs its image's labels (its services, its runtime).
        yield self.docker.refresh_images()
        containers = yield self.backend.list_containers(labels={AGENT_ID_LABEL: agent_id}, all=True)
        # Claims of the warm pool that were committed (the kernel's state written) are
        # finished first, so that their kernels are found where kernels are.
        pool_states = yield self.run_blocking(load_pool_states, self.config.state_dir)
        committed = [
            (pool_id, claimed.get("kernel_id"))
            for pool_id, (_, claimed) in pool_states.items()
            if claimed and isinstance(claimed.get("kernel_id"), str) and check_kernel_id_quietly(claimed["kernel_id"])
        ]
        yield self.run_blocking(finish_claims, self._claims(committed))
        saved = yield self.run_blocking(load_saved_states, self.config.state_dir)
        claimed_pool_ids = {
            state["pool_id"]: kernel_id
            for kernel_id, state in saved.items()
            if state.get("warm") and valid_pool_id(state.get("pool_id"))
        }
        # Cut off between moving its state and moving its home: the home follows now.
        yield self.run_blocking(finish_claims, self._claims(list(claimed_pool_ids.items())))
        pool_found: list[tuple[str, str, bool]] = []  # (pool id, container id, running)
        homes = yield self.run_blocking(leftover_kernel_ids, self.config.scratch_root)
        # What the last run told managers last about each kernel, read once for all of them.
        last_events = {event.kernel_id: event for event in self.journal.since(0) if event.kernel_id}
        adopting: list[tuple[Kernel, AgentEvent | None]] = []
        ending: list[tuple[Kernel, str]] = []
        for container in containers:
            labels = container.get("Labels") or {}
            kernel_id = labels.get(KERNEL_ID_LABEL)
            if labels.get(AGENT_ID_LABEL) != agent_id:
                continue
            if labels.get(POOL_LABEL) == "1":
                if not valid_pool_id(labels.get(POOL_ID_LABEL)):
                    continue  # not a pool container this agent made: left alone
                # A claimed pool container is a kernel (known by its state); the rest, the pool's.
                kernel_id = claimed_pool_ids.get(labels[POOL_ID_LABEL])
                if kernel_id is None:
                    pool_found.append((labels[POOL_ID_LABEL], container["Id"], container.get("State") == "running"))
                    continue
            if not isinstance(kernel_id, str):
                continue
            if not check_kernel_id_quietly(kernel_id):
                continue
            if kernel_id in self.kernels:
                continue
            state = saved.pop(kernel_id, None)
            homes.discard(kernel_id)
            if state is None or state.get("container_id") != container["Id"]:
                ending.append((self._register_ending(kernel_id, container["Id"]), events.ORPHAN_CLEANUP))
                continue
            kernel = self._register_adopted(state, container["Id"]) if container.get("State") == "running" else None
            if kernel is not None:
                adopting.append((kernel, last_events.get(kernel_id)))
            else:
                ending.append((self._register_ending(kernel_id, container["Id"]), events.SELF_TERMINATED))
        for kernel_id in saved:
            # Saved, but its container is gone: it ended while nobody watched.
            homes.discard(kernel_id)
            if kernel_id not in self.kernels:
                ending.append((self._register_ending(kernel_id, None), events.SELF_TERMINATED))
        for kernel_id in homes:
            if kernel_id not in self.kernels and check_kernel_id_quietly(kernel_id):
                ending.append((self._register_ending(kernel_id, None), events.ORPHAN_CLEANUP))
        for kernel_id, event in last_events.items():
            # Announced, then nothing left at all: the last run died while its image was
            # pulled (before any directory or container). Managers hear that it ended.
            if event.type == events.KERNEL_CREATING and kernel_id not in self.kernels:
                self.journal.append(
                    events.KERNEL_TERMINATED,
                    kernel_id,
                    {"reason": events.ORPHAN_CLEANUP, "exit_code": None, "stats": {}},
                )
        # The adopted kernels' services, their host ports reserved before any new kernel's.
        adopted_services = yield self.run_blocking(
            lambda: {kernel.kernel_id: self.workspace(kernel.kernel_id).load_services() for kernel, _ in adopting}
        )
        for kernel, _ in adopting:
            self.services.adopt(kernel, adopted_services.get(kernel.kernel_id))
        # State dirs that no kernel explains (a create killed before it saved): removed
        # before any new kernel can be made, so that none of its directories is taken.
        pool_keep, pool_drop = self._sort_pool(pool_found, pool_states, set(claimed_pool_ids))
        keep = {kernel_key(kernel_id) for kernel_id in self.kernels}
        try:
            yield self.run_blocking(remove_state_dirs_except, self.config.state_dir, keep)
            if self.scratch_volumes is not None:
                kept_homes = [self.workspace(kernel_id).scratch_dir for kernel_id in self.kernels]
                kept_homes += [self._pool_workspace(pool_id).scratch_dir for pool_id, _, _ in pool_keep]
                yield self.run_blocking(self.scratch_volumes.remove_images_except, kept_homes)
        except Exception:
            # Registered kernels must get their second part whatever: never fail here.
            self.log.failure("could not remove the state dirs no kernel explains")
        self.recovered = True
        self.log.info(
            "taking over from the last run: {adopting} kernel(s) to adopt, {ending} to end",
            adopting=len(adopting),
            ending=len(ending),
        )
        work = [
            self.in_flight.track(kernel.lock.run(self._reconnect_adopted, kernel, last)) for kernel, last in adopting
        ]
        work += [self.in_flight.track(kernel.lock.run(self._end_found, kernel, reason)) for kernel, reason in ending]
        work += [self.pool.adopt(image, pool_id, container_id) for pool_id, container_id, image in pool_keep]
        work += [self.pool.remove_found(pool_id, container_id) for pool_id, container_id in pool_drop]
        results = yield DeferredList(work, consumeErrors=True)
        for ok, failure in results:
            if not ok:
                self.log.failure("a part of the take-over failed", failure)
        # Kernels whose runner stayed silent are being ended: that is part of the take-over.
        ending_now = [share(kernel.terminated) for kernel, _ in adopting if kernel.terminated is not None]
        yield DeferredList(ending_now, consumeErrors=True)
        adopted = sum(1 for kernel, _ in adopting if kernel.status == states.RUNNING)
        self.taken_over = True
        self.pool.start()
        self.log.info(
            "took over from the last run: {adopted} kernel(s) adopted, {ended} ended",
            adopted=adopted,
            ended=len(ending) + len(adopting) - adopted,
        )

    def _claims(self, pairs: list[tuple[str, str]]) -> list[tuple[PoolWorkspace, Workspace]]:
        return [(self._pool_workspace(pool_id), self.workspace(kernel_id)) for pool_id, kernel_id in pairs]

    def _pool_workspace(self, pool_id: str) -> PoolWorkspace:
        return PoolWorkspace(self.config.scratch_root, self.config.state_dir, pool_id, self.scratch_volumes)

    def _sort_pool(
        self, found: list[tuple[str, str, bool]], states: dict[str, Any], claimed: set[Any]
    ) -> tuple[list[tuple[str, str, KernelImage]], list[tuple[str, str | None]]]:
        """
        The last run's pool containers to take back (running, with their directories, of an
        image still offered) and what to remove (the other containers, and directories
        whose container is gone).
        """
        keep: list[tuple[str, str, KernelImage]] = []
        drop: list[tuple[str, str | None]] = []
        seen = set()
        for pool_id, container_id, running in found:
            seen.add(pool_id)
            pool_state = (states.get(pool_id) or (None, None))[0]
            image = None
            if pool_state is not None and pool_state.get("container_id") == container_id:
                image = next((i for i in self.docker.images if i.name == pool_state.get("image")), None)
            if running and image is not None:
                keep.append((pool_id, container_id, image))
            else:
                drop.append((pool_id, container_id))
        for pool_id in states:
            if pool_id not in seen and pool_id not in claimed:
                drop.append((pool_id, None))
        return keep, drop

    # -- the first part: registering what was found --------------------------------------------

    def _register_adopted(self, state: dict[str, Any], container_id: str) -> Kernel | None:
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
        now = self.clock.seconds()
        kernel = Kernel(
            kernel_id=kernel_id,
            image=image,
            grant=grant,
            environ=dict(state.get("environ") or {}),
            mounts=mounts,
            idle_timeout=int_or_none(state.get("idle_timeout")) or 0,
            exec_timeout=int_or_none(state.get("exec_timeout")) or 0,
            created_at=_float_or(state.get("created_at"), now),
            last_used=now,
            status=states.RUNNING,
            container_id=container_id,
            warm=bool(state.get("warm")),
            pool_id=state["pool_id"] if valid_pool_id(state.get("pool_id")) else None,
        )
        self.kernels[kernel_id] = kernel
        return kernel

    def _register_ending(self, kernel_id: str, container_id: str | None) -> Kernel:
        """A kernel of the last run found only to be ended: ``terminating`` until it is."""
        kernel = _ending_kernel(kernel_id, container_id)
        kernel.terminated = Deferred()
        self.kernels[kernel_id] = kernel
        return kernel

    def _saved_image(self, state: dict[str, Any]) -> KernelImage:
        for kernel_image in self.docker.images:
            if kernel_image.name == state.get("image"):
                return kernel_image
        # The image was removed or re-tagged meanwhile: the kernel runs on as it is.
        return KernelImage(name=str(state.get("image")), id=str(state.get("image_id")))

    # -- the second part: each kernel, under its lock -------------------------------------------

    @inlineCallbacks
    def _reconnect_adopted(self, kernel: Kernel, last_event: AgentEvent | None) -> Generator[Deferred[Any], Any, None]:
        if kernel.status != states.RUNNING:
            return  # it died meanwhile, and its death was handled first
        if kernel.warm and kernel.container_id is not None:
            # A claim cut short may not have renamed its container yet.
            try:
                yield self.backend.rename_container(
                    kernel.container_id, container_name(self.config.agent_id, kernel.kernel_id)
                )
            except DockerError:
                pass  # already named so (or Docker says why on the next look)
        if (yield self.deaths.reach_runner(kernel)) is None:
            return  # a silent runner's kernel is being ended (after this, under its lock)
        self._announce_adopted(kernel, last_event)
        yield self.services.restore(kernel)
        self.log.info("adopted kernel {kernel_id}", kernel_id=kernel.kernel_id)

    @inlineCallbacks
    def _end_found(self, kernel: Kernel, reason: str) -> Generator[Deferred[Any], Any, None]:
        """End a kernel the take-over found dead or half-made: exit code, then ``end``."""
        if kernel.status == states.TERMINATED:
            return
        if reason == events.ORPHAN_CLEANUP:
            self.log.info("removing what an interrupted create of {kernel_id} left", kernel_id=kernel.kernel_id)
        elif kernel.container_id is not None:
            try:
                state = yield self.backend.inspect_container(kernel.container_id)
                kernel.exit_code = state.get("State", {}).get("ExitCode")
            except DockerError:
                pass
        yield self.end(kernel, reason)
        if kernel.terminated is not None:
            kernel.terminated.callback(kernel.answer())

    def _announce_adopted(self, kernel: Kernel, last: AgentEvent | None) -> None:
        """
        A kernel adopted after the last run was killed between starting its container and
        journaling that it started (or restarted): managers saw ``kernel-creating`` (or
        ``kernel-terminated`` with reason ``restarting``) and then nothing (``last``, the
        kernel's last event). Finish the story.
        """
        if last is None:
            return
        if last.type == events.KERNEL_CREATING:
            self.journal.append(events.KERNEL_STARTED, kernel.kernel_id, kernel.record())
        elif last.type == events.KERNEL_TERMINATED and last.data.get("reason") == events.RESTARTING:
            self.journal.append(events.KERNEL_RESTARTED, kernel.kernel_id, kernel.record())


def _ending_kernel(kernel_id: str, container_id: str | None) -> Kernel:
    """A kernel found at take-over only to be ended: just what ``end`` needs (it holds no grant)."""
    return Kernel.bare(
        kernel_id,
        KernelImage(name="", id=""),
        Grant(kernel_id=kernel_id, cpu=0.0, mem=0),
        status=states.TERMINATING,
        container_id=container_id,
    )


def _float_or(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default
