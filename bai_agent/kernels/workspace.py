"""
The directories of a kernel on the host.

- ``{scratch_root}/{kernel_id}``: the kernel's home, mounted at ``/home/work``, owned by
  the kernel user (uid 1000); removed on destroy, kept across restarts.
- ``{state_dir}/kernels/{key}/``: the agent's own per-kernel state (``kernel.json``;
  ``services.json``, its running services with their host ports and tokens) and ``run/``,
  mounted at ``/run/bai`` and holding the runner's socket. ``key`` is a short hash of the
  kernel id, so the socket path stays under the 107 bytes a UNIX socket address may have,
  whatever the kernel id.

Every function here blocks on the disk: the registry calls them in its thread pool.
"""

import hashlib
import json
import os
import re
from typing import Any

from bai_agent.kernels import pinned_mounts
from bai_agent.node.trees import TreeNotRemoved, remove_tree
from bai_agent.runner import ENVIRON_NAME, SOCKET_NAME

KERNEL_UID = 1000
KERNEL_GID = 1000
MAX_SOCKET_PATH = 107


def kernel_key(kernel_id: str) -> str:
    return hashlib.sha256(kernel_id.encode("utf-8")).hexdigest()[:12]


class Workspace:
    """Paths of one kernel's directories, and the disk work on them."""

    def __init__(self, scratch_root: str, state_dir: str, kernel_id: str, volumes: Any = None) -> None:
        self.kernel_id = kernel_id
        self.volumes = volumes  # the ScratchVolumes that limit homes (None: plain directories)
        self.scratch_dir = os.path.join(scratch_root, kernel_id)
        self.state_dir = os.path.join(state_dir, "kernels", kernel_key(kernel_id))
        self.run_dir = os.path.join(self.state_dir, "run")
        self.socket_path = os.path.join(self.run_dir, SOCKET_NAME)
        self.environ_file = os.path.join(self.run_dir, ENVIRON_NAME)
        self.state_file = os.path.join(self.state_dir, "kernel.json")
        self.services_file = os.path.join(self.state_dir, "services.json")

    def create(self) -> None:
        """Make the home (owned by the kernel user) and the run dir (root only)."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        os.chmod(self.run_dir, 0o700)
        os.mkdir(self.scratch_dir, mode=0o755)
        os.chown(self.scratch_dir, KERNEL_UID, KERNEL_GID)

    def limit_home(self, scratch_size: int) -> None:
        """Make the (new, empty) home hold at most ``scratch_size`` bytes, where the volumes enforce it."""
        if self.volumes is not None and scratch_size:
            self.volumes.limit(self.scratch_dir, scratch_size)

    def clear_run_dir(self) -> None:
        """A restart gets a fresh socket; a stale one would be connected to in vain."""
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def save(self, state: dict) -> None:
        _write_atomically(self.state_file, state)

    def save_services(self, services: list) -> None:
        """The kernel's running services (root only: they hold tokens); nothing once its state dir is gone."""
        try:
            _write_atomically(self.services_file, services)
        except FileNotFoundError:
            pass  # the kernel ended and its state dir was removed

    def load_services(self) -> list:
        """What ``save_services`` saved; an empty list when it is missing or malformed."""
        try:
            with open(self.services_file) as f:
                services = json.load(f)
        except (OSError, ValueError):
            return []
        return services if isinstance(services, list) else []

    def write_environ(self, environ: dict) -> None:
        """The user processes' environment, for the runner (root-only, beside its socket)."""
        _write_atomically(self.environ_file, environ)

    def remove(self) -> None:
        """
        Remove both directories, whatever user code left in the home; what is already
        gone is fine. Raises ``TreeNotRemoved`` (an ``OSError``) for what had to be left
        (an immutable file, a mount point), after trying both.
        """
        if self.volumes is not None:
            self.volumes.remove(self.scratch_dir)  # unmount first: never empty a mount in place
        home = remove_tree(self.scratch_dir)
        _remove_state_dir(self.state_dir)
        home.check()


POOL_DIR = ".pool"  # under the scratch root: the pool's homes (not a kernel id: ids start alphanumeric)
#: A pool id names directories: 12 lower-case hex digits (``secrets.token_hex(6)``), nothing else.
POOL_ID_PATTERN = re.compile(r"[0-9a-f]{12}\Z")


def valid_pool_id(value: object) -> bool:
    return isinstance(value, str) and POOL_ID_PATTERN.match(value) is not None


class PoolWorkspace:
    """
    The directories of a warm pool container (docs/protocol.md section 9), until a claim
    moves them into a kernel's place: ``{scratch_root}/.pool/{pool_id}`` (the home) and
    ``{state_dir}/pool/{pool_id}/`` (``pool.json`` and ``run/``, as a kernel's).
    """

    def __init__(self, scratch_root: str, state_dir: str, pool_id: str, volumes: Any = None) -> None:
        if not valid_pool_id(pool_id):
            # It names directories the agent moves and removes: a label or a state file
            # that says otherwise is not the agent's.
            raise ValueError(f"not a pool id: {str(pool_id)[:40]!r}")
        self.pool_id = pool_id
        self.volumes = volumes
        self.scratch_dir = os.path.join(scratch_root, POOL_DIR, pool_id)
        self.state_dir = os.path.join(state_dir, "pool", pool_id)
        self.run_dir = os.path.join(self.state_dir, "run")
        self.socket_path = os.path.join(self.run_dir, SOCKET_NAME)
        self.environ_file = os.path.join(self.run_dir, ENVIRON_NAME)
        self.state_file = os.path.join(self.state_dir, "pool.json")
        self.claim_file = os.path.join(self.state_dir, "kernel.json")

    def create(self, scratch_size: int) -> None:
        os.makedirs(os.path.dirname(self.scratch_dir), mode=0o700, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        os.mkdir(self.scratch_dir, mode=0o755)
        os.chown(self.scratch_dir, KERNEL_UID, KERNEL_GID)
        if self.volumes is not None and scratch_size:
            self.volumes.limit(self.scratch_dir, scratch_size)

    def save(self, state: dict) -> None:
        _write_atomically(self.state_file, state)

    def claim(self, kernel: Workspace, state: dict, environ: dict) -> None:
        """
        Make the pool container's directories the kernel's. The kernel's state written in the
        pool's state dir is the commit: from then on the take-over of a killed agent finishes
        the claim (``finish_claim``), never undoes it.
        """
        # Not synced: a claim must survive a kill of the agent, which the page cache does; a
        # crash of the machine ends the pool's containers and kernels alike.
        _write_atomically(self.claim_file, state, sync=False)
        finish_claim(self, kernel)
        _write_atomically(kernel.environ_file, environ, sync=False)

    def remove(self) -> None:
        if self.volumes is not None:
            self.volumes.remove(self.scratch_dir)
        home = remove_tree(self.scratch_dir)
        _remove_state_dir(self.state_dir)
        home.check()


def finish_claims(claims: list) -> None:
    """``finish_claim`` of each ``(pool workspace, kernel workspace)``, in one go."""
    for pool, kernel in claims:
        finish_claim(pool, kernel)


def finish_claim(pool: PoolWorkspace, kernel: Workspace) -> None:
    """Move what is still the pool's into the kernel's place (idempotent: a claim may have been cut short)."""
    if os.path.isdir(pool.state_dir) and not os.path.exists(kernel.state_dir):
        os.makedirs(os.path.dirname(kernel.state_dir), mode=0o700, exist_ok=True)
        os.rename(pool.state_dir, kernel.state_dir)
    if os.path.isdir(pool.scratch_dir) and not os.path.exists(kernel.scratch_dir):
        if pool.volumes is not None:
            pool.volumes.move(pool.scratch_dir, kernel.scratch_dir)
        else:
            os.rename(pool.scratch_dir, kernel.scratch_dir)


def load_pool_states(state_dir: str) -> dict:
    """``{pool_id: (pool.json, the claimed kernel's state or None)}`` of ``{state_dir}/pool/*``."""
    found: dict = {}
    root = os.path.join(state_dir, "pool")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return found
    for name in names:
        if not valid_pool_id(name):
            continue
        states = []
        for file in ("pool.json", "kernel.json"):
            try:
                with open(os.path.join(root, name, file)) as f:
                    value = json.load(f)
            except (OSError, ValueError):
                value = None
            states.append(value if isinstance(value, dict) else None)
        found[name] = tuple(states)
    return found


def _write_atomically(path: str, value, sync: bool = True) -> None:
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(temporary, path)


def check_socket_room(state_dir: str) -> None:
    """Raise ``ValueError`` when ``state_dir`` is too long for the runners' socket paths."""
    longest = os.path.join(os.path.abspath(state_dir), "kernels", "0" * 12, "run", SOCKET_NAME)
    if len(longest.encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"state dir {state_dir} is too long: runner sockets under it would exceed "
            f"{MAX_SOCKET_PATH} bytes; use a shorter path"
        )


def load_saved_states(state_dir: str) -> dict:
    """
    ``{kernel_id: saved state}`` of every ``kernel.json`` under ``state_dir``; unreadable
    or malformed files are skipped (the caller cleans what no state explains).
    """
    states: dict[str, dict] = {}
    root = os.path.join(state_dir, "kernels")
    try:
        keys = os.listdir(root)
    except FileNotFoundError:
        return states
    for key in keys:
        try:
            with open(os.path.join(root, key, "kernel.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if (
            isinstance(state, dict)
            and isinstance(state.get("kernel_id"), str)
            and kernel_key(state["kernel_id"]) == key
        ):
            states[state["kernel_id"]] = state
    return states


def leftover_kernel_ids(scratch_root: str) -> set:
    """Kernel ids that still have a home under ``scratch_root``."""
    try:
        return {name for name in os.listdir(scratch_root) if os.path.isdir(os.path.join(scratch_root, name))}
    except FileNotFoundError:
        return set()


def remove_state_dirs_except(state_dir: str, keep_keys: set) -> list:
    """
    Remove ``{state_dir}/kernels/*`` not in ``keep_keys``; the removed keys. Raises the
    first ``TreeNotRemoved`` once all were tried, if one had to be left.
    """
    root = os.path.join(state_dir, "kernels")
    removed: list[str] = []
    try:
        keys = os.listdir(root)
    except FileNotFoundError:
        return removed
    left = []
    for key in keys:
        if key not in keep_keys:
            try:
                _remove_state_dir(os.path.join(root, key))
            except TreeNotRemoved as error:
                left.append(error)
            else:
                removed.append(key)
    if left:
        raise left[0]
    return removed


def _remove_state_dir(path: str) -> None:
    """
    A kernel's state dir, with the mount pins a killed agent may have left in it unmounted
    first (they are binds of host directories: a removal must never empty them; one it
    meets anyway is left mounted and reported).
    """
    try:
        pinned_mounts.unpin(path)
    except OSError:
        pass  # what stays mounted is refused by remove_tree below, and reported
    remove_tree(path).check()
