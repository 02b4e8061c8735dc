"""
The events an agent reports to managers (PROTOCOL.md section 3): their types, and the
reasons a ``kernel-terminated`` event gives in ``data["reason"]``.

Stdlib only: managers import this module too.
"""

from __future__ import annotations

from typing import Final

AGENT_STARTED: Final = "agent-started"
# The last event of a run (a graceful stop, or SIGTERM).
AGENT_STOPPING: Final = "agent-stopping"
KERNEL_CREATING: Final = "kernel-creating"
KERNEL_STARTED: Final = "kernel-started"
KERNEL_RESTARTED: Final = "kernel-restarted"
KERNEL_TERMINATED: Final = "kernel-terminated"
# A service of a kernel listens (data: service, protocol, host, port); section 7.
SERVICE_STARTED: Final = "service-started"
# A started service ended: it exited, was stopped, or its kernel restarted or ended
# (data: service, exit_code, reason); its host port is released.
SERVICE_STOPPED: Final = "service-stopped"
# Pulls of images from registries (section 8): data {image}; {image, bytes_done,
# bytes_total} at most once a second per pull; {image, id, elapsed}; {image, error}.
IMAGE_PULLING: Final = "image-pulling"
IMAGE_PULL_PROGRESS: Final = "image-pull-progress"
IMAGE_PULLED: Final = "image-pulled"
IMAGE_PULL_FAILED: Final = "image-pull-failed"

EVENT_TYPES: Final[tuple[str, ...]] = (
    AGENT_STARTED,
    AGENT_STOPPING,
    KERNEL_CREATING,
    KERNEL_STARTED,
    KERNEL_RESTARTED,
    KERNEL_TERMINATED,
    SERVICE_STARTED,
    SERVICE_STOPPED,
    IMAGE_PULLING,
    IMAGE_PULL_PROGRESS,
    IMAGE_PULLED,
    IMAGE_PULL_FAILED,
)

# The reasons of ``kernel-terminated``.
USER_REQUESTED: Final = "user-requested"
IDLE_TIMEOUT: Final = "idle-timeout"
EXEC_TIMEOUT: Final = "exec-timeout"
# The kernel's memory limit was hit: Docker's OOM report, or a SIGKILL nobody asked for.
OOM_KILLED: Final = "oom-killed"
# The container ended without the agent asking (or its runner stopped answering).
SELF_TERMINATED: Final = "self-terminated"
AGENT_RESET: Final = "agent-reset"
# ``--destroy-kernels-on-stop``: the agent destroyed it as it stopped.
AGENT_STOPPING_REASON: Final = "agent-stopping"
# The end of the kernel's old container in a restart; a ``kernel-restarted`` follows.
RESTARTING: Final = "restarting"
# What an interrupted create left (found at the take-over after a restart), removed.
ORPHAN_CLEANUP: Final = "orphan-cleanup"
CREATION_FAILED: Final = "creation-failed"

TERMINATION_REASONS: Final[tuple[str, ...]] = (
    USER_REQUESTED,
    IDLE_TIMEOUT,
    EXEC_TIMEOUT,
    OOM_KILLED,
    SELF_TERMINATED,
    AGENT_RESET,
    AGENT_STOPPING_REASON,
    RESTARTING,
    ORPHAN_CLEANUP,
    CREATION_FAILED,
)

# The reasons a manager may give to ``DestroyKernel``; the agent's own (``agent-stopping``
# on ``--destroy-kernels-on-stop``, ``oom-killed``, ...) are not for managers to claim.
DESTROY_REASONS: Final[tuple[str, ...]] = (USER_REQUESTED, IDLE_TIMEOUT, EXEC_TIMEOUT, AGENT_RESET)
