"""
The Docker container of a kernel: its name, labels and the Engine API create body, with
the resource limits of its grant and the hardening every kernel gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bai_agent.kernels.workspace import KERNEL_GID, KERNEL_UID
from bai_agent.protocol.labels import AGENT_ID_LABEL, KERNEL_ID_LABEL
from bai_agent.runner import MOUNT_POINT as RUNNER_MOUNT
from bai_agent.runner import STATE_MOUNT_POINT as RUN_MOUNT
from bai_agent.runner import runner_command

if TYPE_CHECKING:
    from bai_agent.docker.images import KernelImage
    from bai_agent.kernels.allocator import Grant
    from bai_agent.kernels.kernel import Kernel
    from bai_agent.kernels.workspace import Workspace

HOME = "/home/work"

# The runner runs as root in the container only to set up user code as uid 1000; these
# are all the capabilities it needs for that. Everything else is dropped.
RUNNER_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID")


def container_name(agent_id: str, kernel_id: str) -> str:
    return f"kernel.{agent_id}.{kernel_id}"


def container_labels(agent_id: str, kernel_id: str) -> dict[str, str]:
    return {KERNEL_ID_LABEL: kernel_id, AGENT_ID_LABEL: agent_id}


def core_count(grant: Grant) -> int:
    """What a kernel should tell its libraries about cores: its pinned or its quota's share."""
    if grant.cpuset:
        return len(grant.cpuset)
    return max(1, math.ceil(grant.cpu))


def kernel_command(image: KernelImage) -> list[str]:
    """The runner, started by the image's own interpreter."""
    return runner_command(
        python=image.runtime_path,
        uid=KERNEL_UID,
        gid=KERNEL_GID,
        home=HOME,
        runtime_type=image.runtime_type,
        runtime_path=image.runtime_path,
    )


def user_environment(kernel: Kernel) -> dict[str, str]:
    """
    The environment of the kernel's user processes: the manager's ``environ`` and the
    image's core-count variables. The runner reads it from the run directory; it is never
    the container's environment, which the runner (root) starts with.
    """
    environ = dict(kernel.environ)
    cores = str(core_count(kernel.grant))
    for name in kernel.image.corecount_envs:
        environ[name] = cores
    return environ


def claim_resources(grant: Grant, pids_limit: int) -> dict[str, Any]:
    """The ``POST /containers/{id}/update`` body that gives a warm pool container ``grant``'s limits."""
    resources: dict[str, Any] = {"Memory": grant.mem, "MemorySwap": grant.mem, "PidsLimit": pids_limit}
    if grant.cpuset:
        resources["CpusetCpus"] = ",".join(str(core) for core in grant.cpuset)
    if grant.cpu_quota_us:
        resources["CpuQuota"] = grant.cpu_quota_us
        resources["CpuPeriod"] = grant.cpu_period_us
    return resources


def container_config(
    kernel: Kernel,
    workspace: Workspace,
    agent_id: str,
    runner_dir: str,
    network: str,
    pids_limit: int,
    mount_binds: Iterable[str] = (),
) -> dict[str, Any]:
    """
    The ``POST /containers/create`` body of ``kernel``; ``mount_binds`` are the ``Binds``
    entries of its mounts, pinned (``pinned_mounts.pin``), never the manager's paths.
    """
    grant = kernel.grant
    host_config = {
        "Binds": [
            f"{workspace.scratch_dir}:{HOME}:rw",
            f"{runner_dir}:{RUNNER_MOUNT}:ro",
            f"{workspace.run_dir}:{RUN_MOUNT}:rw",
        ]
        + list(mount_binds),
        "NetworkMode": network,
        # Nothing outside the home, /tmp and the runner's directory is writable: the
        # image's layer cannot grow on the host's disk. /tmp is memory, counted in the
        # kernel's memory limit, so it is at most that big.
        "ReadonlyRootfs": True,
        "Tmpfs": {"/tmp": f"rw,nosuid,nodev,size={grant.mem},mode=1777"},
        "Memory": grant.mem,
        "MemorySwap": grant.mem,  # equal limits: no swap
        "PidsLimit": pids_limit,
        "Privileged": False,
        "CapDrop": ["ALL"],
        "CapAdd": list(RUNNER_CAPABILITIES),
        "SecurityOpt": ["no-new-privileges"],
        "IpcMode": "private",
        "RestartPolicy": {"Name": "no"},
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
    }
    if grant.cpuset:
        host_config["CpusetCpus"] = ",".join(str(core) for core in grant.cpuset)
    if grant.cpu_quota_us:
        host_config["CpuQuota"] = grant.cpu_quota_us
        host_config["CpuPeriod"] = grant.cpu_period_us
    if grant.cuda_devices:
        host_config["DeviceRequests"] = [
            {
                "Driver": "nvidia",
                "DeviceIDs": [str(index) for index in grant.cuda_devices],
                "Capabilities": [["gpu"]],
            }
        ]
    return {
        "Image": kernel.image.id,
        "Entrypoint": [],
        "Cmd": kernel_command(kernel.image),
        "Env": [f"HOME={HOME}"],
        "Labels": container_labels(agent_id, kernel.kernel_id),
        "User": "0:0",
        "WorkingDir": HOME,
        "Tty": False,
        "OpenStdin": False,
        "HostConfig": host_config,
    }
