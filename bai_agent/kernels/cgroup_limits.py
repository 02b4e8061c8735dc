"""
A warm claim's limits written straight into the container's cgroup (docs/protocol.md
section 9): what ``runc update`` behind Docker's ``POST /containers/{id}/update`` writes,
without its 10 ms or more of process start. The Engine API update is still sent, with the
same values, so that Docker's record of the container says what is in force; the claim
answers once the cgroup has them, not once Docker has said so.

cgroup v1 (``memory``, ``cpu``, ``cpuset`` controllers) and v2 (the unified tree) are
written; memory and memory+swap are set in the order the kernel accepts (+swap never below
the limit). Anything unexpected raises ``CgroupLimitsError``: the caller then waits for the
Engine API update instead.
"""

from __future__ import annotations

import os

from bai_agent.kernels.allocator import Grant
from bai_agent.stats.cgroups import candidate_paths, controller_mounts, detect_cgroup_version

__all__ = ["CgroupLimits", "CgroupLimitsError"]

V1_CONTROLLERS = ("memory", "cpu", "cpuset")


class CgroupLimitsError(Exception):
    """The limits could not be written: the container's cgroup is not where it was expected."""


class CgroupLimits:
    """
    :param root: where the cgroup hierarchies are mounted.
    :param parent: Docker's ``--cgroup-parent``, if the daemon has one.
    """

    def __init__(self, root: str = "/sys/fs/cgroup", parent: str | None = None) -> None:
        self.root = root
        self.parent = parent
        self.version = detect_cgroup_version(root)
        self._mounts = controller_mounts(root, V1_CONTROLLERS) if self.version == 1 else {}

    def _directory(self, base: str | None, container_id: str) -> str:
        if base is not None:
            for candidate in candidate_paths(container_id, self.parent):
                path = os.path.join(base, candidate)
                if os.path.isdir(path):
                    return path
        raise CgroupLimitsError(f"no cgroup of container {container_id[:12]} under {base}")

    def apply(self, container_id: str, grant: Grant) -> None:
        """Give the running container ``container_id`` the limits of ``grant`` (memory, no swap, CPU)."""
        if not container_id or "/" in container_id or container_id.startswith("."):
            raise CgroupLimitsError(f"not a container id: {container_id!r}")
        try:
            if self.version == 2:
                self._apply_v2(self._directory(self.root, container_id), grant)
            else:
                self._apply_v1(container_id, grant)
        except OSError as e:
            raise CgroupLimitsError(f"writing the limits of {container_id[:12]}: {e}") from e

    def _apply_v1(self, container_id: str, grant: Grant) -> None:
        memory = self._directory(self._mounts.get("memory"), container_id)
        limit = os.path.join(memory, "memory.limit_in_bytes")
        with_swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
        order = [limit, with_swap]
        if os.path.exists(with_swap) and grant.mem > _read_int(limit):
            order.reverse()  # raising: +swap first, so that it is never below the limit
        for path in order:
            if path == limit or os.path.exists(path):
                _write(path, str(grant.mem))
        if grant.cpuset:
            _write(
                os.path.join(self._directory(self._mounts.get("cpuset"), container_id), "cpuset.cpus"),
                ",".join(str(core) for core in grant.cpuset),
            )
        if grant.cpu_quota_us:
            cpu = self._directory(self._mounts.get("cpu"), container_id)
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(grant.cpu_period_us))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(grant.cpu_quota_us))

    def _apply_v2(self, directory: str, grant: Grant) -> None:
        _write(os.path.join(directory, "memory.max"), str(grant.mem))
        swap = os.path.join(directory, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        if grant.cpuset:
            _write(os.path.join(directory, "cpuset.cpus"), ",".join(str(core) for core in grant.cpuset))
        if grant.cpu_quota_us:
            _write(os.path.join(directory, "cpu.max"), f"{grant.cpu_quota_us} {grant.cpu_period_us}")


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)  # as `echo v > file` opens it
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
