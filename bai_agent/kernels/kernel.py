"""
One kernel: its record (PROTOCOL.md section 5) and what the agent holds for it.

Statuses move ``creating -> running -> (restarting -> running)* -> terminating ->
terminated``; the registry owns the transitions and serialises them per kernel.
"""

import attrs
from twisted.internet.defer import DeferredLock

CREATING = "creating"
RUNNING = "running"
RESTARTING = "restarting"
TERMINATING = "terminating"
TERMINATED = "terminated"

STATUSES = (CREATING, RUNNING, RESTARTING, TERMINATING, TERMINATED)


@attrs.define(eq=False)
class Kernel:
    kernel_id: str
    image: object  # KernelImage
    grant: object  # allocator.Grant
    environ: dict
    mounts: tuple
    idle_timeout: int
    exec_timeout: int
    created_at: float
    last_used: float
    status: str = CREATING
    container_id: str = None
    exit_code: int = None
    link: object = None  # RunnerLink while running
    session: object = None  # ExecutionSession over that link
    reconnecting: object = None  # Deferred of a runner reconnection under way
    oom_killed: bool = False
    kill_seen: bool = False  # Docker reported a kill signal sent through its API
    last_stats: dict = attrs.Factory(dict)
    lock: DeferredLock = attrs.Factory(DeferredLock)
    terminated: object = None  # Deferred firing with the destroy answer once terminated

    def record(self) -> dict:
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
        }
        if self.exit_code is not None:
            record["exit_code"] = self.exit_code
        return record

    def saved_state(self) -> dict:
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
        }
