"""
Per-container resource counters, read straight from the cgroup filesystem.

Docker's stats API costs a round trip through the daemon and, without ``one-shot``, a
second sample a second later; the kernel already keeps every counter we need in small
text files. ``CgroupReader.read`` opens a handful of them per container (plain
``open``/``read``, no subprocess, no Docker call) and is meant to run in a thread off the
reactor: it blocks on the filesystem, however briefly.

Both hierarchies are supported, detected once at start:

- v1 (one mount per controller, possibly co-mounted as ``cpu,cpuacct``):
  ``cpuacct.usage``, ``memory.usage_in_bytes``/``memory.max_usage_in_bytes``,
  ``blkio.throttle.io_service_bytes``, ``pids.current``;
- v2 (one unified tree): ``cpu.stat`` ``usage_usec``, ``memory.current``/``memory.peak``,
  ``io.stat``, ``pids.current``.

A container's cgroup is looked for where both Docker cgroup drivers put it: cgroupfs
(``docker/<id>``) and systemd (``system.slice/docker-<id>.scope``), or under a
``parent`` (Docker's ``--cgroup-parent``). Network counters are not in a cgroup: they are
read from ``/proc/<pid>/net/dev`` of a process of the container, which sees the
container's network namespace.

Nothing here raises on what the kernel (or a vanishing container) hands back: a missing
cgroup is ``None``, a missing or garbled counter is 0 and is reported once in
``problems``, which the caller drains and logs (on its own thread: these reads run in a
worker thread, and logging from there could interleave with the reactor's).
"""

from __future__ import annotations

import collections
import os
import re
import threading
from typing import Any

#: What a container id may look like; anything else would be a path, not a name.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
#: A cgroup parent: relative path components of the same safe characters.
_PARENT_PART = re.compile(r"^[A-Za-z0-9_@:.-]+\Z")

V1_CONTROLLERS = ("cpuacct", "memory", "blkio", "pids")


def detect_cgroup_version(root: str = "/sys/fs/cgroup") -> int:
    """
    2 when ``root`` is a unified (v2) hierarchy, else 1.

    A hybrid host (v1 controllers with an empty v2 tree at ``root/unified``, as here)
    is 1: the controllers that count are the v1 ones. The v2 root is recognised by its
    ``cgroup.controllers`` file, which no v1 mount has.
    """
    return 2 if os.path.isfile(os.path.join(root, "cgroup.controllers")) else 1


def _systemd_slice_path(slice_name: str) -> str:
    """``a-b-c.slice`` -> ``a.slice/a-b.slice/a-b-c.slice``, as systemd nests slices."""
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _checked_parent(parent: str | None) -> str | None:
    if parent is None:
        return None
    if not isinstance(parent, str):
        raise ValueError(f"cgroup parent must be a string, not {parent!r}")
    parts = [part for part in parent.strip("/").split("/") if part]
    if not parts or any(part in (".", "..") or not _PARENT_PART.match(part) for part in parts):
        raise ValueError(f"invalid cgroup parent {parent!r}")
    return "/".join(parts)


def candidate_paths(container_id: str, parent: str | None = None) -> list[str]:
    """
    Where, relative to a hierarchy's root, Docker may have put ``container_id``'s cgroup,
    most likely first for the given ``parent`` (none: Docker's defaults).
    """
    candidates = []
    if parent is not None:
        candidates.append(f"{parent}/{container_id}")  # cgroupfs driver
        if "/" not in parent and parent.endswith(".slice"):
            candidates.append(f"{_systemd_slice_path(parent)}/docker-{container_id}.scope")
        candidates.append(f"{parent}/docker-{container_id}.scope")
    candidates.append(f"docker/{container_id}")
    candidates.append(f"system.slice/docker-{container_id}.scope")
    return candidates


def controller_mounts(root: str, controllers: tuple[str, ...]) -> dict[str, str]:
    """v1 controller -> its mount dir under ``root``; co-mounted ones (``cpu,cpuacct``) included."""
    mounts: dict[str, str] = {}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return mounts
    for name in names:
        for controller in name.split(","):
            if controller in controllers and (controller not in mounts or name == controller):
                mounts[controller] = os.path.join(root, name)
    return mounts


class CgroupReader:
    """
    Reads a container's counters; see the module docstring.

    :param root: where the cgroup hierarchies are mounted.
    :param version: 1 or 2; ``None`` detects it from ``root``.
    :param proc: the procfs mount, for ``<pid>/net/dev``.
    :param parent: Docker's ``--cgroup-parent``, when the daemon was given one.

    Located cgroup paths are cached per container until a read finds the cgroup gone.
    Safe to call from several threads (the caches are plain dict updates).
    """

    def __init__(
        self, root: str = "/sys/fs/cgroup", version: int | None = None, proc: str = "/proc", parent: str | None = None
    ) -> None:
        if version is None:
            version = detect_cgroup_version(root)
        if version not in (1, 2):
            raise ValueError(f"cgroup version must be 1 or 2, not {version!r}")
        self.root = root
        self.version = version
        self.proc = proc
        self.parent = _checked_parent(parent)
        self._mounts = self._controller_mounts() if version == 1 else {}
        self._located: dict[str, dict[str, str]] = {}
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        #: ``(container_id, message)`` of each new problem, for the caller to log.
        self.problems: collections.deque[tuple[str, str]] = collections.deque(maxlen=1000)

    def __repr__(self) -> str:
        return f"<CgroupReader v{self.version} {self.root}>"

    # -- locating ---------------------------------------------------------------------

    def _controller_mounts(self) -> dict[str, str]:
        return controller_mounts(self.root, V1_CONTROLLERS)

    def _locate(self, container_id: str) -> dict[str, str] | None:
        located = self._located.get(container_id)
        if located is not None:
            return located
        candidates = candidate_paths(container_id, self.parent)
        if self.version == 2:
            found = self._first_dir(self.root, candidates)
            located = None if found is None else {"unified": found}
        else:
            cpuacct = self._mounts.get("cpuacct")
            if cpuacct is None:
                return None
            found = self._first_dir(cpuacct, candidates)
            if found is None:
                return None
            relative = os.path.relpath(found, cpuacct)
            located = {"cpuacct": found}
            for controller in ("memory", "blkio", "pids"):
                mount = self._mounts.get(controller)
                if mount is not None:
                    located[controller] = os.path.join(mount, relative)
        if located is not None:
            self._located[container_id] = located
        return located

    @staticmethod
    def _first_dir(base: str, candidates: list[str]) -> str | None:
        for candidate in candidates:
            path = os.path.join(base, candidate)
            if os.path.isdir(path):
                return path
        return None

    def forget(self, container_id: str) -> None:
        """Drop what is cached about ``container_id`` (it was removed)."""
        self._located.pop(container_id, None)
        with self._lock:
            self._reported = {key for key in self._reported if key[0] != container_id}

    # -- reading ----------------------------------------------------------------------

    def read(self, container_id: str) -> dict[str, int | None] | None:
        """
        ``{cpu_used_ns, mem_bytes, mem_max_bytes, io_read_bytes, io_write_bytes,
        net_rx_bytes, net_tx_bytes, pids, pid}`` of ``container_id``, or ``None`` when
        its cgroup does not exist (not started yet, or gone). ``pid`` is one process of
        the container (``None`` when it has none). ``mem_max_bytes`` is the kernel's
        peak where it keeps one, else the current usage (the caller keeps the maximum).
        """
        if not isinstance(container_id, str) or not _CONTAINER_ID.match(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        located = self._locate(container_id)
        if located is None:
            return None
        try:
            sample = self._read_v2(container_id, located) if self.version == 2 else self._read_v1(container_id, located)
        except FileNotFoundError:
            # The cgroup went away under us: the container ended.
            self.forget(container_id)
            return None
        pid, rx, tx = self._read_network(container_id, sample.pop("_procs_dir"))
        sample.update(pid=pid, net_rx_bytes=rx, net_tx_bytes=tx)
        return sample

    def _read_v1(self, container_id: str, located: dict[str, str]) -> dict[str, Any]:
        cpuacct = located["cpuacct"]
        # The one file that must be there: without it the cgroup is gone (FileNotFoundError).
        cpu_used_ns = self._number(container_id, os.path.join(cpuacct, "cpuacct.usage"), required=True)
        memory = located.get("memory")
        mem_bytes = mem_max_bytes = 0
        if memory is not None:
            mem_bytes = self._number(container_id, os.path.join(memory, "memory.usage_in_bytes"))
            mem_max_bytes = self._number(container_id, os.path.join(memory, "memory.max_usage_in_bytes"))
        io_read = io_write = 0
        blkio = located.get("blkio")
        if blkio is not None:
            io_read, io_write = self._blkio_v1(container_id, blkio)
        pids_dir = located.get("pids")
        pids = self._number(container_id, os.path.join(pids_dir, "pids.current")) if pids_dir else 0
        return {
            "cpu_used_ns": cpu_used_ns,
            "mem_bytes": mem_bytes,
            "mem_max_bytes": max(mem_bytes, mem_max_bytes),
            "io_read_bytes": io_read,
            "io_write_bytes": io_write,
            "pids": pids,
            "_procs_dir": pids_dir or memory or cpuacct,
        }

    def _read_v2(self, container_id: str, located: dict[str, str]) -> dict[str, Any]:
        unified = located["unified"]
        cpu_stat = self._text(container_id, os.path.join(unified, "cpu.stat"), required=True) or ""  # never None
        usage_usec = self._keyed(container_id, "cpu.stat", cpu_stat).get("usage_usec", 0)
        mem_bytes = self._number(container_id, os.path.join(unified, "memory.current"))
        peak_path = os.path.join(unified, "memory.peak")
        # memory.peak exists from Linux 5.19; before it the collector keeps the maximum.
        peak = self._number(container_id, peak_path, optional=True)
        io_read = io_write = 0
        io_stat = self._text(container_id, os.path.join(unified, "io.stat")) or ""  # None only if optional
        for line in io_stat.splitlines():
            # "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=.."
            for field in line.split()[1:]:
                key, equals, word = field.partition("=")
                if not equals:
                    self._problem(container_id, f"io.stat: unexpected field {field!r}")
                elif key == "rbytes":
                    io_read += self._parse_int(container_id, "io.stat", word)
                elif key == "wbytes":
                    io_write += self._parse_int(container_id, "io.stat", word)
        pids = self._number(container_id, os.path.join(unified, "pids.current"))
        return {
            "cpu_used_ns": usage_usec * 1000,
            "mem_bytes": mem_bytes,
            "mem_max_bytes": max(mem_bytes, peak),
            "io_read_bytes": io_read,
            "io_write_bytes": io_write,
            "pids": pids,
            "_procs_dir": unified,
        }

    def _blkio_v1(self, container_id: str, blkio: str) -> tuple[int, int]:
        text = None
        for name in ("blkio.throttle.io_service_bytes", "blkio.throttle.io_service_bytes_recursive"):
            text = self._text(container_id, os.path.join(blkio, name), optional=True)
            if text is not None:
                break
        if text is None:
            self._problem(container_id, f"{blkio}: no blkio.throttle.io_service_bytes")
            return 0, 0
        read = write = 0
        for line in text.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "Total":
                continue
            if len(fields) != 3:
                if fields:
                    self._problem(container_id, f"blkio.throttle.io_service_bytes: unexpected line {line!r}")
                continue
            value = self._parse_int(container_id, "blkio.throttle.io_service_bytes", fields[2])
            if fields[1] == "Read":
                read += value
            elif fields[1] == "Write":
                write += value
        return read, write

    def _read_network(self, container_id: str, procs_dir: str) -> tuple[int | None, int, int]:
        """One member pid, and rx/tx bytes of its network namespace without ``lo``."""
        procs = self._text(container_id, os.path.join(procs_dir, "cgroup.procs"), optional=True) or ""
        pid = None
        # The first process may exit between the two reads: try a few.
        for word in procs.split()[:5]:
            if not word.isdigit():
                self._problem(container_id, f"cgroup.procs: unexpected {word!r}")
                break
            try:
                with open(os.path.join(self.proc, word, "net", "dev")) as f:
                    text = f.read()
            except OSError:
                continue
            pid = int(word)
            rx, tx = self._net_dev(container_id, text)
            return pid, rx, tx
        return pid, 0, 0

    def _net_dev(self, container_id: str, text: str) -> tuple[int, int]:
        rx = tx = 0
        for line in text.splitlines()[2:]:  # two header lines
            name, colon, counters = line.partition(":")
            if not colon:
                continue
            if name.strip() == "lo":
                continue
            fields = counters.split()
            if len(fields) < 16:
                self._problem(container_id, f"net/dev: unexpected line {line!r}")
                continue
            rx += self._parse_int(container_id, "net/dev", fields[0])
            tx += self._parse_int(container_id, "net/dev", fields[8])
        return rx, tx

    # -- small file helpers -----------------------------------------------------------

    def _text(self, container_id: str, path: str, required: bool = False, optional: bool = False) -> str | None:
        """
        The file's text. Missing: ``FileNotFoundError`` if ``required`` (the cgroup is
        gone), ``None`` if ``optional``, else ``""`` and a problem. Other errors: a problem.
        """
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            if required:
                raise
            if not optional:
                self._problem(container_id, f"{path} is missing")
            return None if optional else ""
        except (OSError, UnicodeDecodeError) as error:
            self._problem(container_id, f"{path}: {error}")
            return None if optional else ""

    def _number(self, container_id: str, path: str, required: bool = False, optional: bool = False) -> int:
        text = self._text(container_id, path, required=required, optional=optional)
        if not text:
            return 0
        return self._parse_int(container_id, os.path.basename(path), text.strip())

    def _keyed(self, container_id: str, name: str, text: str) -> dict[str, int]:
        """``key value`` lines -> ``{key: int}``; garbled lines are problems."""
        values: dict[str, int] = {}
        for line in text.splitlines():
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                self._problem(container_id, f"{name}: unexpected line {line!r}")
                continue
            values[fields[0]] = self._parse_int(container_id, name, fields[1])
        return values

    def _parse_int(self, container_id: str, name: str, word: str) -> int:
        try:
            value = int(word)
        except ValueError:
            if word == "max":  # v2 limits; not a counter, but not junk either
                return 0
            self._problem(container_id, f"{name}: not a number: {word[:80]!r}")
            return 0
        if value < 0:
            self._problem(container_id, f"{name}: negative value {value}")
            return 0
        return value

    def _problem(self, container_id: str, message: str) -> None:
        # Once per container and kind of problem, not once per sample.
        key = (container_id, message.split(":")[0])
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        self.problems.append((container_id, message))

    def drain_problems(self) -> list[tuple[str, str]]:
        """The problems reported since the last call (each only the first time)."""
        drained = []
        while self.problems:
            try:
                drained.append(self.problems.popleft())
            except IndexError:
                break
        return drained
