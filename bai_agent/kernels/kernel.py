"""
One kernel: its record (PROTOCOL.md section 5) and what the agent holds for it.

Statuses move ``creating -> running -> (restarting -> running)* -> terminating ->
terminated``; the registry owns the transitions and serialises them per kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock

if TYPE_CHECKING:
    from bai_agent.docker.images import KernelImage
    from bai_agent.kernels.allocator import Grant
    from bai_agent.kernels.execution import ExecutionSession
    from bai_agent.kernels.runner_link import RunnerLink
    from bai_agent.kernels.spec import Mount

CREATING = "creating"
RUNNING = "running"
RESTARTING = "restarting"
TERMINATING = "terminating"
TERMINATED = "terminated"

STATUSES = (CREATING, RUNNING, RESTARTING, TERMINATING, TERMINATED)


@attrs.define(eq=False)
class Kernel:
    kernel_id: str
    image: KernelImage
    grant: Grant
    environ: dict[str, str]
    mounts: tuple[Mount, ...]
    idle_timeout: int
    exec_timeout: int
    created_at: float
    last_used: float
    status: str = CREATING
    container_id: str | None = None
    exit_code: int | None = None
    link: RunnerLink | None = None  # while running
    session: ExecutionSession | None = None  # over that link
    reconnecting: Deferred[RunnerLink] | None = None  # a runner reconnection under way
    oom_killed: bool = False
    kill_seen: bool = False  # Docker reported a kill signal sent through its API
    last_stats: dict[str, Any] = attrs.Factory(dict)
    lock: DeferredLock = attrs.Factory(DeferredLock)
    terminated: Deferred[dict[str, Any]] | None = None  # fires with the destroy answer once terminated
    pulling: Deferred[Any] | None = None  # the wait for its image's pull (cancel: stop waiting)
    warm: bool = False  # it came from the warm pool (section 9)
    pool_id: str | None = None  # and was that pool container

    def record(self) -> dict[str, Any]:
        record = {
            "kernel_id": self.kernel_id,
            "image": self.image.name,
            "status": self.status,
            "container_id": self.container_id,
            "created_at": self.created_at,
            "last_used": self.last_used,
            "resources": self.grant.to_json(),
            "idle_timeout": self.idle_timeout,
            "exec_timeout": self.exec_timeout,
            "warm": self.warm,
        }
        if self.exit_code is not None:
            record["exit_code"] = self.exit_code
        return record

    def saved_state(self) -> dict[str, Any]:
        """What ``kernel.json`` keeps, so that a restarted agent can adopt the kernel."""
        return {
            "kernel_id": self.kernel_id,
            "image": self.image.name,
            "image_id": self.image.id,
            "container_id": self.container_id,
            "created_at": self.created_at,
            "resources": self.grant.to_json(),
            "environ": self.environ,
            "mounts": [mount.to_json() for mount in self.mounts],
            "idle_timeout": self.idle_timeout,
            "exec_timeout": self.exec_timeout,
            "warm": self.warm,
            "pool_id": self.pool_id,
        }

    @classmethod
    def bare(cls, kernel_id: str, image: KernelImage, grant: Grant, **fields: Any) -> Kernel:
        """A kernel with no environment, mounts or timeouts: a stand-in (one being ended, a pool container's body)."""
        return cls(
            kernel_id=kernel_id,
            image=image,
            grant=grant,
            environ={},
            mounts=(),
            idle_timeout=0,
            exec_timeout=0,
            created_at=0.0,
            last_used=0.0,
            **fields,
        )

    def answer(self) -> dict[str, Any]:
        """The answer to ``DestroyKernel`` (and what ``terminated`` fires with)."""
        answer: dict[str, Any] = {"kernel_id": self.kernel_id, "stats": dict(self.last_stats)}
        if self.exit_code is not None:
            answer["exit_code"] = self.exit_code
        return answer
