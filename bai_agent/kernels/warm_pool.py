"""
The warm pool (docs/protocol.md section 9): per image, N started containers with their
runner up and no kernel in them, that a ``CreateKernel`` claims instead of waiting for
Docker to create and start one.

A pool container is made like a kernel's container (the same hardening, the same
runner), with no grant: all cores, ``POOL_MEM`` of memory, its own directories
(``PoolWorkspace``), the labels ``ai.backend.agent-id``, ``ai.backend.pool=1`` and
``ai.backend.pool-id``, and the name ``pool.{agent_id}.{pool_id}``. ``take`` hands a ready
one to the registry, which claims it (``KernelRegistry._claim``); the pool is refilled in
the background after each claim and each loss, one container at a time, backing off on
errors so that a pool that cannot be filled never takes the machine from cold creates.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import Logger

from bai_agent.docker.interface import DockerError, DockerNotFound
from bai_agent.kernels.allocator import Grant
from bai_agent.kernels.container import container_config
from bai_agent.kernels.deaths import RUNNER_START_TIMEOUT, int_or_none
from bai_agent.kernels.kernel import Kernel
from bai_agent.kernels.workspace import PoolWorkspace
from bai_agent.protocol.labels import AGENT_ID_LABEL, POOL_ID_LABEL, POOL_LABEL
from bai_agent.runtime.backoff import Backoff

if TYPE_CHECKING:
    from bai_agent.config import AgentConfig
    from bai_agent.docker.images import KernelImage
    from bai_agent.docker.service import DockerService

log = Logger()

POOL_MEM = 256 << 20  # a pool container's memory until it is claimed (at least its image's minimum)


def pool_container_name(agent_id: str, pool_id: str) -> str:
    return f"pool.{agent_id}.{pool_id}"


@attrs.define(eq=False)
class PoolEntry:
    """One container of the pool."""

    pool_id: str
    image: KernelImage
    workspace: PoolWorkspace
    status: str = "filling"  # filling, ready, claimed, removing, gone
    container_id: str | None = None
    link: Any = None


@attrs.define
class PoolCounters:
    claims: int = 0
    misses: int = 0  # creates the pool could have served, had it had a ready container
    filled: int = 0
    failures: int = 0
    last_refill_seconds: float | None = None


class WarmPool:
    """
    :param reactor: timers, and what ``connect_runner`` needs.
    :param config: the ``AgentConfig`` (agent id, directories, network, pids limit, ``warm_pool``).
    :param backend: the ``IDockerBackend``.
    :param docker: the ``DockerService`` (its kernel images).
    :param run_blocking: ``(f, *args) -> Deferred``, disk work off the reactor thread.
    :param connect_runner: as the registry's.
    :param runner_dir: the runner's directory on the host.
    :param volumes: the ``ScratchVolumes`` of the homes, or None.
    :param mem_capacity: the machine's memory (the size of a pool container's ``/tmp``
        mount, which its kernel's memory limit bounds once claimed).
    """

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        backend: Any,
        docker: DockerService,
        run_blocking: Callable[..., Deferred[Any]],
        connect_runner: Callable[..., Deferred[Any]],
        runner_dir: str,
        volumes: Any,
        mem_capacity: int,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.backend = backend
        self.docker = docker
        self.run_blocking = run_blocking
        self.connect_runner = connect_runner
        self.runner_dir = runner_dir
        self.volumes = volumes
        self.mem_capacity = mem_capacity
        self.command_line_targets = dict(config.warm_pool)
        self.targets = dict(self.command_line_targets)
        self.entries: dict[str, PoolEntry] = {}
        self.counters = PoolCounters()
        self.problem: str | None = None  # why the pool is not full, when it cannot be filled
        self.running = False
        self._filling: Deferred[None] | None = None
        self._backoff = Backoff(random.random, initial=1.0, maximum=60.0)
        self._wakeup: Any = None

    # -- what others ask ----------------------------------------------------------------------

    def set_targets(self, targets: dict[str, int] | None) -> None:
        """The cluster's ``warm_pool`` (None: back to the command line's); applied now."""
        self.targets = dict(self.command_line_targets if targets is None else targets)
        log.info("warm pool: {targets}", targets=self.targets or "none")
        self.kick()

    def take(self, image: KernelImage) -> PoolEntry | None:
        """
        A ready container of ``image`` for a claim (counted), or None (a miss, if it has a
        pool). After a claim, ``kick`` refills.
        """
        if self.targets.get(image.name, 0) <= 0 and not self._ready(image.name):
            return None
        for entry in self.entries.values():
            if entry.status == "ready" and entry.image.name == image.name and entry.image.id == image.id:
                entry.status = "claimed"
                del self.entries[entry.pool_id]
                self.counters.claims += 1
                # No refill yet: its Docker calls would queue behind, and slow, the claim's
                # own (the registry kicks the pool once the claim is done).
                return entry
        self.counters.misses += 1
        self.kick()
        return None

    def discard(self, entry: PoolEntry) -> Deferred[None]:
        """Remove a container a claim could not use (and its directories, wherever they are)."""
        entry.status = "gone"
        return self._remove(entry)

    def describe(self) -> dict[str, Any]:
        """The status page's and /metrics' view."""
        images = {}
        for image in sorted(set(self.targets) | {entry.image.name for entry in self.entries.values()}):
            mine = [entry for entry in self.entries.values() if entry.image.name == image]
            images[image] = {
                "target": self.targets.get(image, 0),
                "ready": sum(1 for entry in mine if entry.status == "ready"),
                "filling": sum(1 for entry in mine if entry.status == "filling"),
                "removing": sum(1 for entry in mine if entry.status == "removing"),
            }
        return {"images": images, "problem": self.problem, **attrs.asdict(self.counters)}

    def keeps(self, image: KernelImage) -> bool:
        """Whether the pool has containers of ``image``, or is to have some."""
        return self.targets.get(image.name, 0) > 0 or any(e.image.id == image.id for e in self.entries.values())

    def container_ids(self) -> set[str]:
        return {entry.container_id for entry in self.entries.values() if entry.container_id}

    # -- the service's life ---------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.kick()

    @inlineCallbacks
    def stop(self, destroy: bool) -> Generator[Deferred[Any], Any, None]:
        """Stop filling; the containers stay for the next start, unless ``destroy``."""
        self.running = False
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        if self._filling is not None:
            yield DeferredList([self._filling], consumeErrors=True)
        entries = list(self.entries.values())
        for entry in entries:
            if entry.link is not None:
                entry.link.close("agent stopping")
        if destroy:
            self.entries.clear()
            yield DeferredList([self._remove(entry) for entry in entries], consumeErrors=True)

    def adopt(self, image: KernelImage, pool_id: str, container_id: str) -> Deferred[None]:
        """A pool container of the last run (the take-over): reached again, or removed."""
        entry = PoolEntry(pool_id, image, self._workspace(pool_id), container_id=container_id)
        self.entries[pool_id] = entry

        def reached(link: Any) -> None:
            if entry.status != "filling":
                link.close("no longer wanted")
                return
            self._ready_with(entry, link)

        def lost(failure: Any) -> Deferred[None]:
            log.info("warm pool: container {pool_id} of the last run does not answer; removed", pool_id=pool_id)
            self.entries.pop(pool_id, None)
            return self._remove(entry)

        @inlineCallbacks
        def reach() -> Generator[Deferred[Any], Any, Any]:
            # A claim cut off before its commit may have renamed it already.
            try:
                yield self.backend.rename_container(container_id, pool_container_name(self.config.agent_id, pool_id))
            except DockerError:
                pass  # already so named
            return (
                yield self.connect_runner(self.reactor, entry.workspace.socket_path, self.reactor, RUNNER_START_TIMEOUT)
            )

        return reach().addCallbacks(reached, lost)

    def remove_found(self, pool_id: str, container_id: str | None) -> Deferred[None]:
        """A pool container (or directories) of the last run not worth keeping."""
        return self._clear(pool_id, container_id, self._workspace(pool_id))

    def docker_event(self, event: dict[str, Any]) -> None:
        """A pool container died (or was removed behind the agent's back): refill."""
        if event.get("Type") != "container" or (event.get("Action") or event.get("status")) not in ("die", "destroy"):
            return
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if attributes.get(AGENT_ID_LABEL) != self.config.agent_id or attributes.get(POOL_LABEL) != "1":
            return
        entry = self.entries.get(str(attributes.get(POOL_ID_LABEL)))
        container_id = (event.get("Actor") or {}).get("ID") or event.get("id")
        if entry is not None and entry.container_id == container_id and entry.status in ("ready", "filling"):
            log.warn(
                "warm pool: container {pool_id} ended (exit code {code}); refilling",
                pool_id=entry.pool_id,
                code=int_or_none(attributes.get("exitCode")),
            )
            self._lose(entry)

    # -- filling ---------------------------------------------------------------------------------

    def kick(self) -> None:
        """Fill (or shrink) towards the targets, in the background, one container at a time."""
        if not self.running or self._filling is not None:
            return
        filling = self._fill_loop()
        filling.addErrback(lambda failure: log.failure("the warm pool's filling failed", failure))
        if not filling.called:  # (with fakes it may be done already)
            self._filling = filling

    @inlineCallbacks
    def _fill_loop(self) -> Generator[Deferred[Any], Any, None]:
        try:
            while self.running:
                surplus = self._surplus()
                if surplus is not None:
                    surplus.status = "removing"  # shown until its container and directories are gone
                    try:
                        yield self._remove(surplus)
                    finally:
                        self.entries.pop(surplus.pool_id, None)
                        surplus.status = "gone"
                    continue
                image = self._wanted()
                if image is None:
                    return  # full (or only images not here are wanted: _wanted says so)
                started = time.monotonic()
                try:
                    yield self._fill(image)
                except Exception as e:
                    self.counters.failures += 1
                    delay = self._backoff.next_delay()
                    self.problem = f"cannot fill the pool of {image.name}: {e} (retrying in {delay:.0f}s)"
                    log.warn("warm pool: {problem}", problem=self.problem)
                    yield self._sleep(delay)
                    continue
                self._backoff.reset()
                self.counters.filled += 1
                self.counters.last_refill_seconds = round(time.monotonic() - started, 4)
        finally:
            self._filling = None

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._wakeup = self.reactor.callLater(seconds, d.callback, None)
        return d

    def _ready(self, image_name: str) -> int:
        return sum(1 for e in self.entries.values() if e.image.name == image_name and e.status == "ready")

    def _surplus(self) -> PoolEntry | None:
        for entry in self.entries.values():
            count = sum(1 for e in self.entries.values() if e.image.name == entry.image.name and e.status != "removing")
            if entry.status == "ready" and count > self.targets.get(entry.image.name, 0):
                return entry
        return None

    def _wanted(self) -> KernelImage | None:
        problems = []
        for name, target in sorted(self.targets.items()):
            have = sum(1 for e in self.entries.values() if e.image.name == name and e.status != "removing")
            if have >= target:
                continue
            image = next((i for i in self.docker.images if i.name == name), None)
            if image is None:
                problems.append(f"{name} is not a local kernel image")
                continue
            return image
        self.problem = "; ".join(problems) or None
        return None

    @inlineCallbacks
    def _fill(self, image: KernelImage) -> Generator[Deferred[Any], Any, None]:
        pool_id = secrets.token_hex(6)
        entry = self.entries[pool_id] = PoolEntry(pool_id, image, self._workspace(pool_id))
        workspace = entry.workspace
        try:
            yield self.run_blocking(workspace.create, self.config.default_scratch_size)
            entry.container_id = yield self.backend.create_container(
                pool_container_name(self.config.agent_id, pool_id), self._container_config(entry)
            )
            yield self.run_blocking(
                workspace.save, {"pool_id": pool_id, "container_id": entry.container_id, "image": image.name}
            )
            yield self.backend.start_container(entry.container_id)
            link = yield self.connect_runner(self.reactor, workspace.socket_path, self.reactor, RUNNER_START_TIMEOUT)
        except BaseException:
            self.entries.pop(pool_id, None)
            entry.status = "gone"
            yield self._remove(entry)
            raise
        if entry.status != "filling" or not self.running:
            link.close("the pool stopped")
            return
        self._ready_with(entry, link)

    def _ready_with(self, entry: PoolEntry, link: Any) -> None:
        entry.link = link
        entry.status = "ready"
        link.handler = lambda message: None  # nothing to hear until it is claimed
        link.dead.addCallback(lambda reason: self._link_lost(entry, link))

    def _link_lost(self, entry: PoolEntry, link: Any) -> None:
        if entry.status == "ready" and entry.link is link and self.running:
            log.warn("warm pool: lost the runner of {pool_id}; replacing it", pool_id=entry.pool_id)
            self._lose(entry)

    def _lose(self, entry: PoolEntry) -> None:
        self.entries.pop(entry.pool_id, None)
        entry.status = "gone"
        if entry.link is not None:
            entry.link.close("pool container lost")
        self._remove(entry).addCallback(lambda _: self.kick())

    def _workspace(self, pool_id: str) -> PoolWorkspace:
        return PoolWorkspace(self.config.scratch_root, self.config.state_dir, pool_id, self.volumes)

    def _container_config(self, entry: PoolEntry) -> dict[str, Any]:
        mem = max(POOL_MEM, entry.image.min_mem)
        stand_in = Kernel.bare(entry.pool_id, entry.image, Grant(kernel_id=entry.pool_id, cpu=0.0, mem=mem))
        body = container_config(
            stand_in,
            entry.workspace,  # type: ignore[arg-type]
            self.config.agent_id,
            self.runner_dir,
            self.config.kernel_network,
            self.config.kernel_pids_limit,
        )
        body["Labels"] = {AGENT_ID_LABEL: self.config.agent_id, POOL_LABEL: "1", POOL_ID_LABEL: entry.pool_id}
        # /tmp cannot be resized later: its kernel's memory limit bounds it once claimed.
        body["HostConfig"]["Tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={self.mem_capacity},mode=1777"}
        return body

    def _remove(self, entry: PoolEntry) -> Deferred[None]:
        if entry.link is not None:
            entry.link.close("pool container removed")
        return self._clear(entry.pool_id, entry.container_id, entry.workspace)

    @inlineCallbacks
    def _clear(
        self, pool_id: str, container_id: str | None, workspace: PoolWorkspace
    ) -> Generator[Deferred[Any], Any, None]:
        """Remove a pool container (by name when its id is unknown) and its directories."""
        container = container_id or pool_container_name(self.config.agent_id, pool_id)
        try:
            yield self.backend.remove_container(container, force=True)
        except DockerNotFound:
            pass
        except DockerError as e:
            log.warn("warm pool: could not remove {container}: {error}", container=container, error=e)
        try:
            yield self.run_blocking(workspace.remove)
        except Exception as e:
            log.warn("warm pool: could not remove the directories of {pool_id}: {error}", pool_id=pool_id, error=e)
