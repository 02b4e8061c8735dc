"""
An in-memory ``IDockerBackend`` for tests: deterministic, no reactor, every Deferred
already fired (except ``wait_container`` on a running container, which fires when it
dies), events delivered synchronously to open streams.
"""

import copy
import hashlib
import json
import re
import signal as _signal
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer
from zope.interface.interface import Method

from bai_agent.docker.engine import pick_api_version
from bai_agent.docker.interface import (
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
    IDockerBackend,
    IEventStream,
)

log = Logger()

_CONTAINER_NAME = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+\Z")

#: Signals whose default action is to do nothing: a fake container survives them.
_HARMLESS_SIGNALS = {_signal.SIGCHLD, _signal.SIGCONT, _signal.SIGURG, _signal.SIGWINCH}

_NEVER = "0001-01-01T00:00:00Z"


def _signal_number(signal):
    """``"SIGKILL"``, ``"KILL"``, ``"9"`` or ``9`` -> 9; ``DockerError`` (400) otherwise."""
    text = str(signal).strip().upper()
    if text.isdigit() and int(text) in {s.value for s in _signal.Signals}:
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return _signal.Signals[name].value
    except KeyError:
        raise DockerError(f"Invalid signal: {signal}", status=400) from None


def _timestamp(seconds):
    return f"2023-11-14T{(seconds // 3600) % 24:02d}:{(seconds // 60) % 60:02d}:{seconds % 60:02d}.000000000Z"


class _FakeContainer:
    """One container of the fake daemon; ``status`` is created, running or exited."""

    def __init__(self, container_id, name, config, image_id, image_labels, created):
        self.id = container_id
        self.name = name
        self.config = config
        self.image_id = image_id
        self.labels = dict(image_labels)
        self.labels.update(config.get("Labels") or {})
        self.host_config = dict(config.get("HostConfig") or {})
        self.created = created
        self.status = "created"
        self.exit_code = 0
        self.oom_killed = False
        self.pid = 0
        self.started_at = _NEVER
        self.finished_at = _NEVER
        self.logs = ""
        self.waiters = []

    @property
    def image_name(self):
        return self.config["Image"]

    @property
    def cmd(self):
        return list(self.config.get("Cmd") or [])


class _InjectedFailure:
    def __init__(self, error, applied):
        self.error = error
        self.applied = applied


def _normalise_tag(name):
    """``repo`` means ``repo:latest``, as for the daemon."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@implementer(IEventStream)
class FakeEventStream:
    def __init__(self, backend, on_event, filters):
        self.done = None  # set by the backend
        self._backend = backend
        self._on_event = on_event
        self._filters = filters or {}

    def cancel(self):
        self._backend._end_stream(self, None)

    def _matches(self, event):
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        fields = {
            "type": [event.get("Type")],
            "event": [event.get("Action")],
            "image": [actor.get("ID"), attributes.get("name")],
            "container": [actor.get("ID"), attributes.get("name")],
        }
        for key, wanted in self._filters.items():
            if key == "label":
                # Every label asked for must be there: "key" or "key=value".
                for label in wanted:
                    key, has_value, value = label.partition("=")
                    if key not in attributes or (has_value and attributes[key] != value):
                        return False
            elif key in fields and not set(wanted) & set(fields[key]):
                return False
        return True

    def _deliver(self, event):
        if not self._matches(event):
            return
        try:
            self._on_event(copy.deepcopy(event))
        except Exception:
            log.failure("an events consumer raised on {event!r}", event=event)


@implementer(IEventStream)
class FakePullStream:
    def __init__(self, on_progress):
        self.done: Deferred[None] = Deferred(lambda d: None)
        self.on_progress = on_progress
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        if not self.done.called:
            self.done.callback(None)


@implementer(IDockerBackend)
class FakeDockerBackend:
    """
    ``IDockerBackend`` in memory.

    Test controls: ``add_image``, ``tag_image``, ``delete_image`` (each emits the image
    event the daemon would), ``emit_event``, ``end_streams`` (the daemon closes its
    event streams), ``set_available(False)`` (the daemon goes away: calls fail with
    ``DockerUnavailable`` and open streams fail). ``calls`` records each method called,
    as ``(name, argument)`` (for container methods the argument is the container id or
    name as given); ``closed`` tells whether ``close`` was called.

    Containers live in memory with the daemon's states (created, running, exited), its
    409s and 404s and its messages, and emit the container events the daemon does
    (``create``, ``start``, ``kill``, ``oom``, ``die``, ``stop``, ``update``,
    ``destroy``), with the same fields. No process runs: a started container runs
    until a test ends it with ``die``, or with ``kill_container``/``stop_container``/
    ``remove_container``, which kill it with the signal's exit code (128 + signal
    number, 137 for SIGKILL, 143 for the SIGTERM of a stop; the fake's processes die of
    every signal whose default action terminates). Container controls: ``die``,
    ``set_logs``, ``on_start`` (make a command behave: print, exit, run out of memory),
    ``fail_next`` (make the next call of a method fail), ``container_status``.
    """

    def __init__(self, daemon_api_version="1.41", daemon_version="20.10.24", max_api_version="1.43"):
        self.api_version = None
        self.daemon_api_version = daemon_api_version
        self.daemon_version = daemon_version
        self.max_api_version = max_api_version
        self.available = True
        self.closed = False
        self.calls = []
        self._images = {}  # id -> {"tags": [...], "labels": {...}, "legacy": bool, "created": int}
        self._streams = []
        self._clock = 1700000000
        self._containers = {}  # id -> _FakeContainer, in creation order
        self._programs = {}  # tuple(Cmd) -> callable(container_id), run at start
        self._failures = {}  # method name -> [_InjectedFailure], the next first
        self._pids = 4000
        self._registry = {}  # reference -> {"labels", "credentials", "size"}
        self._holding_pulls = False
        self._held_pulls = []
        self.pulls = []

    # -- test controls -------------------------------------------------------------

    def add_image(self, name, labels, image_id=None, legacy_labels=False, emit_events=True):
        """
        Create an image tagged ``name`` with ``labels`` (in ``ContainerConfig`` only when
        ``legacy_labels``), or add the tag to ``image_id`` when that image exists.
        A tag held by another image moves, as ``docker tag`` does. Return the image id.
        ``emit_events=False`` makes the change silently (as if the events were missed).
        """
        name = _normalise_tag(name)
        if image_id is None:
            digest = hashlib.sha256(json.dumps([name, labels, legacy_labels], sort_keys=True).encode())
            image_id = "sha256:" + digest.hexdigest()
        created = image_id not in self._images
        if created:
            self._clock += 1
            self._images[image_id] = {
                "tags": [],
                "labels": dict(labels),
                "legacy": legacy_labels,
                "created": self._clock,
            }
        self._take_tag(name, emit_events)
        self._images[image_id]["tags"].append(name)
        if emit_events:
            self._image_event("tag", image_id, name)
            if created:
                self._image_event("import", image_id, image_id)
        return image_id

    def add_image_file(self, name, path, data):
        """Put a file (bytes; a str makes a symlink to it) at ``path`` in the image ``name``, for ``read_file``."""
        self._images[self._resolve(name)].setdefault("files", {})[path] = data

    def tag_image(self, source, target):
        """Tag the image ``source`` (name or id) as ``target``."""
        return self.add_image(target, {}, image_id=self._resolve(source))

    def delete_image(self, name):
        """
        Remove the tag ``name`` (the image too once untagged), or the image ``name`` names
        by id with all its tags. ``DockerNotFound`` when absent.
        """
        image_id = self._resolve(name)
        image = self._images[image_id]
        tag = _normalise_tag(name)
        untag = [tag] if tag in image["tags"] else list(image["tags"])
        for t in untag:
            image["tags"].remove(t)
            self._image_event("untag", image_id, t)
        if not image["tags"]:
            del self._images[image_id]
            self._image_event("delete", image_id, image_id)

    def add_registry_image(self, reference, labels, credentials=None, size=1000):
        """
        Offer ``reference`` (``name:tag`` or ``name@digest``) to ``pull_image``, with the
        image ``labels``; ``credentials`` ``(username, password)`` makes the registry
        refuse a pull without them. ``pulls`` records ``(reference, auth)`` of each pull;
        ``hold_pulls()`` keeps the next pulls going until ``finish_pulls()``.
        """
        self._registry[reference] = {"labels": dict(labels), "credentials": credentials, "size": size}

    def hold_pulls(self):
        self._holding_pulls = True

    def finish_pulls(self, error=None):
        """End the held pulls: as the registry would, or every one failed with ``error``."""
        self._holding_pulls = False
        held, self._held_pulls = self._held_pulls, []
        for stream, reference, auth in held:
            if not stream.done.called:
                self._finish_pull(stream, reference, auth, error)

    def emit_event(self, event):
        """Deliver ``event`` (a dict as the daemon sends it) to every open stream it matches."""
        for stream in list(self._streams):
            if stream in self._streams:
                stream._deliver(event)

    def end_streams(self):
        """The daemon closes every open events stream cleanly."""
        for stream in list(self._streams):
            self._end_stream(stream, None)

    def set_available(self, available):
        """Simulate the daemon going away (False) or coming back (True)."""
        self.available = available
        if not available:
            for stream in list(self._streams):
                self._end_stream(stream, DockerUnavailable("the events stream broke: daemon gone"))

    @property
    def open_streams(self):
        return len(self._streams)

    def die(self, container_id, exit_code, oom=False, oom_event="before"):
        """
        The running container's main process exits with ``exit_code``: emit ``oom``
        first when ``oom`` (and inspect then shows ``State.OOMKilled``), then ``die``
        with ``exitCode``; ``wait_container`` calls fire. ``ValueError`` when the
        container is not running (a mistake in the test).

        ``oom_event`` replays how Docker 20.10 on cgroup v1 reports an OOM kill when
        the host is busy: ``"before"`` (the usual), ``"after"`` (``die`` first, ``oom``
        up to ~200 ms later, and ``OOMKilled`` stays false) or ``"missing"`` (no ``oom``
        event, ``OOMKilled`` false: only the exit code, 137, tells).
        """
        if oom_event not in ("before", "after", "missing"):
            raise ValueError(f"oom_event must be 'before', 'after' or 'missing', not {oom_event!r}")
        container = self._container(container_id)
        if container.status != "running":
            raise ValueError(f"container {container_id} is {container.status}, not running")
        if oom and oom_event == "before":
            container.oom_killed = True
            self._container_event("oom", container)
        self._exit(container, exit_code)
        if oom and oom_event == "after":
            self._container_event("oom", container)

    def set_logs(self, container_id, text):
        """What ``container_logs`` answers for the container from now on."""
        self._container(container_id).logs = text

    def on_start(self, cmd, behaviour):
        """
        Call ``behaviour(container_id)`` each time a container whose ``Cmd`` is ``cmd``
        starts, right after its ``start`` event and before ``start_container`` fires:
        e.g. ``set_logs`` then ``die(..., 0)`` for a command that prints and exits.
        """
        self._programs[tuple(cmd)] = behaviour

    def fail_next(self, method_name, error, applied=False):
        """
        Make the next call of ``method_name`` (an ``IDockerBackend`` method) fail with
        ``error``. By default the call does nothing else; ``applied=True`` lets the call
        take effect first, as when the daemon did the work and the answer was lost
        (a ``create_container`` that made the container, then timed out). Several
        failures for one method apply one call each, in order.
        """
        if not isinstance(IDockerBackend.get(method_name), Method):
            raise ValueError(f"{method_name!r} is not an IDockerBackend method")
        self._failures.setdefault(method_name, []).append(_InjectedFailure(error, applied))

    def container_status(self, container_id):
        """``"created"``, ``"running"`` or ``"exited"``; None when there is no such container."""
        try:
            return self._container(container_id).status
        except DockerNotFound:
            return None

    # -- IDockerBackend ----------------------------------------------------------------

    def negotiate(self):
        return self._call("negotiate", None, self._negotiate)

    def ping(self):
        return self._call("ping", None, lambda: None)

    def list_images(self):
        return self._call("list_images", None, self._summaries)

    def inspect_image(self, name):
        return self._call("inspect_image", name, lambda: self._inspect(self._resolve(name)))

    def pull_image(self, reference, auth, on_progress):
        self.calls.append(("pull_image", reference))
        self.pulls.append((reference, auth))
        stream = FakePullStream(on_progress)
        if not self.available:
            stream.done.errback(DockerUnavailable("POST /images/create: daemon gone"))
        elif self._holding_pulls:
            self._held_pulls.append((stream, reference, auth))
            on_progress({"status": "Pulling fs layer", "id": "layer1", "progressDetail": {}})
        else:
            self._finish_pull(stream, reference, auth, None)
        return stream

    def remove_image(self, name):
        return self._call("remove_image", name, lambda: self._remove_image(name))

    def stream_events(self, on_event, filters=None):
        self.calls.append(("stream_events", filters))
        stream = FakeEventStream(self, on_event, filters)
        failure = self._take_failure("stream_events")
        if not self.available:
            stream.done = fail(DockerUnavailable("GET /events: daemon gone"))
        elif failure is not None:
            stream.done = fail(failure.error)
        else:
            stream.done = Deferred()
            self._streams.append(stream)
        return stream

    def create_container(self, name, config):
        return self._call("create_container", name, lambda: self._create(name, config))

    def start_container(self, container_id):
        return self._call("start_container", container_id, lambda: self._start(container_id))

    def inspect_container(self, container_id):
        return self._call("inspect_container", container_id, lambda: self._inspect_container(container_id))

    def list_containers(self, labels=None, all=True):
        return self._call("list_containers", labels, lambda: self._list(labels, all))

    def kill_container(self, container_id, signal="SIGKILL"):
        return self._call("kill_container", container_id, lambda: self._kill(container_id, signal))

    def stop_container(self, container_id, timeout=10):
        return self._call("stop_container", container_id, lambda: self._stop(container_id))

    def remove_container(self, container_id, force=True, volumes=True):
        return self._call("remove_container", container_id, lambda: self._remove(container_id, force))

    def wait_container(self, container_id):
        return self._call("wait_container", container_id, lambda: self._wait(container_id))

    def container_logs(self, container_id, tail=None):
        return self._call("container_logs", container_id, lambda: self._logs(container_id, tail))

    def read_file(self, container_id, path, max_bytes):
        return self._call("read_file", container_id, lambda: self._read_file(container_id, path, max_bytes))

    def rename_container(self, container_id, name):
        return self._call("rename_container", container_id, lambda: self._rename(container_id, name))

    def update_container(self, container_id, resources):
        return self._call("update_container", container_id, lambda: self._update(container_id, resources))

    def close(self):
        self.calls.append(("close", None))
        self.closed = True
        self.end_streams()
        return succeed(None)

    # -- internals --------------------------------------------------------------------

    def _call(self, name, argument, result):
        """
        Record the call and answer it with ``result()`` (a value, or a Deferred that
        fires later), or with the failure it raised, an injected one, or the daemon's
        absence.
        """
        self.calls.append((name, argument))
        if not self.available:
            return fail(DockerUnavailable(f"{name}: daemon gone"))
        injected = self._take_failure(name)
        if injected is not None and not injected.applied:
            return fail(injected.error)
        try:
            value = result()
        except Exception as e:
            return fail(e)
        if injected is not None:
            return fail(injected.error)
        return value if isinstance(value, Deferred) else succeed(value)

    def _finish_pull(self, stream, reference, auth, error):
        if error is None:
            error = self._pull_refusal(reference, auth)
        if error is not None:
            stream.done.errback(error)
            return
        offered = self._registry[reference]
        size = offered["size"]
        for done in (size // 2, size):
            stream.on_progress(
                {"status": "Downloading", "id": "layer1", "progressDetail": {"current": done, "total": size}}
            )
        stream.on_progress({"status": "Pull complete", "id": "layer1", "progressDetail": {}})
        self.add_image(reference, offered["labels"])
        stream.done.callback(None)

    def _pull_refusal(self, reference, auth):
        offered = self._registry.get(reference)
        wanted = None if offered is None else offered["credentials"]
        given = None
        if auth:
            import base64

            document = json.loads(base64.urlsafe_b64decode(auth.encode() + b"=" * (-len(auth) % 4)))
            given = (document.get("username"), document.get("password"))
        if wanted is not None and given is None:
            return DockerError(f'Head "http://registry/v2/{reference}": no basic auth credentials', status=500)
        if wanted is not None and given != tuple(wanted):
            return DockerError("unauthorized: authentication required", status=500)
        if offered is None:
            return DockerNotFound(f"manifest for {reference} not found: manifest unknown: manifest unknown", status=404)
        return None

    def _remove_image(self, name):
        image_id = self._resolve(name)
        users = [c for c in self._containers.values() if c.image_id == image_id]
        if users:
            raise DockerConflict(
                f'conflict: unable to remove repository reference "{name}" (must force) - '
                f"container {users[0].id[:12]} is using its referenced image {image_id[7:19]}",
                status=409,
            )
        self.delete_image(name)

    def _take_failure(self, name):
        queue = self._failures.get(name)
        if not queue:
            return None
        failure = queue.pop(0)
        if not queue:
            del self._failures[name]
        return failure

    def _negotiate(self):
        self.api_version = pick_api_version(self.daemon_api_version, self.max_api_version)
        return {
            "Version": self.daemon_version,
            "ApiVersion": self.daemon_api_version,
            "MinAPIVersion": "1.12",
            "Os": "linux",
            "Arch": "amd64",
        }

    def _resolve(self, name):
        """The id of the image ``name`` names (tag, full id, or unique id prefix)."""
        if name in self._images:
            return name
        tag = _normalise_tag(name)
        for image_id, image in self._images.items():
            if tag in image["tags"]:
                return image_id
        hex_prefix = name[len("sha256:") :] if name.startswith("sha256:") else name
        matches = [i for i in self._images if hex_prefix and i[len("sha256:") :].startswith(hex_prefix)]
        if len(matches) == 1:
            return matches[0]
        raise DockerNotFound(f"No such image: {name}", status=404)

    def _take_tag(self, tag, emit_events):
        for image_id, image in list(self._images.items()):
            if tag in image["tags"]:
                image["tags"].remove(tag)
                if emit_events:
                    self._image_event("untag", image_id, tag)

    def _inspect(self, image_id):
        image = self._images[image_id]
        labels = dict(image["labels"]) or None
        return {
            "Id": image_id,
            "RepoTags": list(image["tags"]),
            "RepoDigests": [],
            "Created": f"2023-11-14T22:13:{image['created'] % 60:02d}Z",
            "Config": {"Env": None, "Cmd": None, "Labels": None if image["legacy"] else labels},
            "ContainerConfig": {"Env": None, "Cmd": None, "Labels": labels if image["legacy"] else None},
            "Architecture": "amd64",
            "Os": "linux",
            "Size": 3,
        }

    def _summaries(self):
        return [
            {
                "Id": image_id,
                "ParentId": "",
                "RepoTags": list(image["tags"]),
                "RepoDigests": [],
                "Created": image["created"],
                "Size": 3,
                "SharedSize": -1,
                "Labels": None if image["legacy"] else (dict(image["labels"]) or None),
                "Containers": -1,
            }
            for image_id, image in self._images.items()
        ]

    def _image_event(self, action, image_id, name):
        self._clock += 1
        self.emit_event(
            {
                "status": action,
                "id": image_id,
                "Type": "image",
                "Action": action,
                "Actor": {"ID": image_id, "Attributes": {"name": name}},
                "scope": "local",
                "time": self._clock,
                "timeNano": self._clock * 10**9,
            }
        )

    # -- containers -------------------------------------------------------------------

    def _container(self, ref):
        """The container ``ref`` names: full id, name (with or without "/"), unique id prefix."""
        if ref in self._containers:
            return self._containers[ref]
        name = ref[1:] if isinstance(ref, str) and ref.startswith("/") else ref
        for container in self._containers.values():
            if container.name == name:
                return container
        if isinstance(ref, str) and ref:
            matches = [c for c in self._containers.values() if c.id.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        raise DockerNotFound(f"No such container: {ref}", status=404)

    def _read_file(self, ref, path, max_bytes):
        container = self._container(ref)
        files = self._images.get(container.image_id, {}).get("files", {})
        if path not in files:
            raise DockerNotFound(f"Could not find the file {path} in container {ref}", status=404)
        data = files[path]
        if not isinstance(data, bytes):
            raise DockerError(f"{path} in container {ref[:12]} is not a regular file")
        if len(data) > max_bytes:
            raise DockerError(f"{path} in container {ref[:12]} is {len(data)} bytes, more than {max_bytes}")
        return data

    def _create(self, name, config):
        config = copy.deepcopy(config)
        if name is None:
            name = f"fake_container_{len(self._containers) + 1}"
        if not _CONTAINER_NAME.match(name):
            raise DockerError(
                f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed",
                status=400,
            )
        name = name.lstrip("/")
        for other in self._containers.values():
            if other.name == name:
                raise DockerConflict(
                    f'Conflict. The container name "/{name}" is already in use by container '
                    f'"{other.id}". You have to remove (or rename) that container to be able '
                    "to reuse that name.",
                    status=409,
                )
        if not config.get("Image"):
            raise DockerError("Config cannot be empty in order to create a container", status=400)
        image_id = self._resolve(config["Image"])
        self._clock += 1
        digest = hashlib.sha256(f"{name}/{self._clock}/{len(self._containers)}".encode())
        container = _FakeContainer(
            digest.hexdigest(),
            name,
            config,
            image_id,
            self._images[image_id]["labels"],
            self._clock,
        )
        self._containers[container.id] = container
        self._container_event("create", container)
        return container.id

    def _start(self, ref):
        container = self._container(ref)
        if container.status == "running":
            return None  # the daemon's 304
        self._pids += 1
        self._clock += 1
        container.status = "running"
        container.pid = self._pids
        container.exit_code = 0
        container.oom_killed = False
        container.started_at = _timestamp(self._clock)
        container.finished_at = _NEVER
        self._container_event("start", container)
        program = self._programs.get(tuple(container.cmd))
        if program is not None:
            program(container.id)
        return None

    def _inspect_container(self, ref):
        container = self._container(ref)
        config = container.config
        cmd = container.cmd
        host_config = {"NetworkMode": "default", "Memory": 0, "MemorySwap": 0}
        host_config.update(container.host_config)
        return copy.deepcopy(
            {
                "Id": container.id,
                "Created": _timestamp(container.created),
                "Path": cmd[0] if cmd else "",
                "Args": cmd[1:],
                "State": {
                    "Status": container.status,
                    "Running": container.status == "running",
                    "Paused": False,
                    "Restarting": False,
                    "OOMKilled": container.oom_killed,
                    "Dead": False,
                    "Pid": container.pid,
                    "ExitCode": container.exit_code,
                    "Error": "",
                    "StartedAt": container.started_at,
                    "FinishedAt": container.finished_at,
                },
                "Image": container.image_id,
                "Name": "/" + container.name,
                "RestartCount": 0,
                "Config": {
                    "Hostname": container.id[:12],
                    "User": config.get("User", ""),
                    "Tty": bool(config.get("Tty", False)),
                    "OpenStdin": bool(config.get("OpenStdin", False)),
                    "Env": config.get("Env"),
                    "Cmd": cmd or None,
                    "Image": config["Image"],
                    "WorkingDir": config.get("WorkingDir", ""),
                    "Entrypoint": config.get("Entrypoint"),
                    "Labels": dict(container.labels),
                },
                "HostConfig": host_config,
            }
        )

    def _list(self, labels, all):
        wanted = dict(labels or {})
        summaries = []
        # Newest first, as the daemon lists them.
        for container in reversed(list(self._containers.values())):
            if not all and container.status != "running":
                continue
            labels = container.labels
            if any(key not in labels or (value is not None and labels[key] != value) for key, value in wanted.items()):
                continue
            if container.status == "running":
                status = "Up Less than a second"
            elif container.status == "exited":
                status = f"Exited ({container.exit_code}) Less than a second ago"
            else:
                status = "Created"
            summaries.append(
                {
                    "Id": container.id,
                    "Names": ["/" + container.name],
                    "Image": container.image_name,
                    "ImageID": container.image_id,
                    "Command": " ".join(container.cmd),
                    "Created": container.created,
                    "Ports": [],
                    "Labels": dict(container.labels),
                    "State": container.status,
                    "Status": status,
                    "HostConfig": {"NetworkMode": container.host_config.get("NetworkMode", "default")},
                    "Mounts": [],
                }
            )
        return summaries

    def _kill(self, ref, signal):
        try:
            container = self._container(ref)
        except DockerNotFound as e:
            raise DockerNotFound(f"Cannot kill container: {ref}: {e.message}", status=404) from None
        number = _signal_number(signal)
        if container.status != "running":
            raise DockerConflict(
                f"Cannot kill container: {ref}: Container {container.id} is not running",
                status=409,
            )
        self._signal(container, number)

    def _signal(self, container, number):
        self._container_event("kill", container, signal=str(number))
        if number not in _HARMLESS_SIGNALS:
            self._exit(container, 128 + number)

    def _stop(self, ref):
        container = self._container(ref)
        if container.status != "running":
            return  # the daemon's 304
        self._signal(container, _signal.SIGTERM)
        self._container_event("stop", container)

    def _remove(self, ref, force):
        container = self._container(ref)
        if container.status == "running":
            if not force:
                raise DockerConflict(
                    f"You cannot remove a running container {container.id}. Stop the "
                    "container before attempting removal or force remove",
                    status=409,
                )
            self._signal(container, _signal.SIGKILL)
        # Subscribers run synchronously here and may have removed it already (the real
        # daemon would answer that second removal with 404 or 409).
        if self._containers.pop(container.id, None) is not None:
            self._container_event("destroy", container)

    def _wait(self, ref):
        container = self._container(ref)
        if container.status != "running":
            return container.exit_code
        waiter: Deferred[Any] = Deferred(lambda d: container.waiters.remove(d) if d in container.waiters else None)
        container.waiters.append(waiter)
        return waiter

    def _logs(self, ref, tail):
        container = self._container(ref)
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise DockerError(f"tail must be None or a non-negative integer, not {tail!r}")
        lines = container.logs.splitlines(keepends=True)
        if tail is not None:
            lines = lines[len(lines) - tail :] if tail else []
        return "".join(lines)

    def _rename(self, ref, name):
        container = self._container(ref)
        name = name.lstrip("/")
        if not _CONTAINER_NAME.match(name):
            raise DockerError(f"Invalid container name ({name})", status=400)
        for other in self._containers.values():
            if other.name == name and other is not container:
                raise DockerConflict(f'Conflict. The container name "/{name}" is already in use', status=409)
        old, container.name = container.name, name
        self._container_event("rename", container, oldName="/" + old)

    def _update(self, ref, resources):
        container = self._container(ref)
        container.host_config.update(copy.deepcopy(resources))
        self._container_event("update", container)
        return []

    def _exit(self, container, exit_code):
        self._clock += 1
        container.status = "exited"
        container.exit_code = exit_code
        container.pid = 0
        container.finished_at = _timestamp(self._clock)
        self._container_event("die", container, exitCode=str(exit_code))
        waiters, container.waiters = container.waiters, []
        for waiter in waiters:
            waiter.callback(exit_code)

    def _container_event(self, action, container, **attributes):
        self._clock += 1
        actor_attributes = dict(container.labels)
        actor_attributes.update(image=container.image_name, name=container.name)
        actor_attributes.update(attributes)
        self.emit_event(
            {
                "status": action,
                "id": container.id,
                "from": container.image_name,
                "Type": "container",
                "Action": action,
                "Actor": {"ID": container.id, "Attributes": actor_attributes},
                "scope": "local",
                "time": self._clock,
                "timeNano": self._clock * 10**9,
            }
        )

    def _end_stream(self, stream, error):
        if stream not in self._streams:
            return
        self._streams.remove(stream)
        if error is None:
            stream.done.callback(None)
        else:
            stream.done.errback(error)
