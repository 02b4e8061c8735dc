"""
An in-memory ``IDockerBackend`` for tests: deterministic, no reactor, every Deferred
already fired, events delivered synchronously to open streams.
"""

import copy
import hashlib
import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from bai_agent.docker.engine import pick_api_version
from bai_agent.docker.interface import (
    DockerNotFound,
    DockerUnavailable,
    IDockerBackend,
    IEventStream,
)

log = Logger()


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
        fields = {
            "type": [event.get("Type")],
            "event": [event.get("Action")],
            "image": [actor.get("ID"), (actor.get("Attributes") or {}).get("name")],
            "container": [actor.get("ID"), (actor.get("Attributes") or {}).get("name")],
        }
        for key, wanted in self._filters.items():
            if key in fields and not set(wanted) & set(fields[key]):
                return False
        return True

    def _deliver(self, event):
        if not self._matches(event):
            return
        try:
            self._on_event(copy.deepcopy(event))
        except Exception:
            log.failure("an events consumer raised on {event!r}", event=event)


@implementer(IDockerBackend)
class FakeDockerBackend:
    """
    ``IDockerBackend`` in memory.

    Test controls: ``add_image``, ``tag_image``, ``remove_image`` (each emits the image
    event the daemon would), ``emit_event``, ``end_streams`` (the daemon closes its
    event streams), ``set_available(False)`` (the daemon goes away: calls fail with
    ``DockerUnavailable`` and open streams fail). ``calls`` records each method called,
    as ``(name, argument)``; ``closed`` tells whether ``close`` was called.
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

    def tag_image(self, source, target):
        """Tag the image ``source`` (name or id) as ``target``."""
        return self.add_image(target, {}, image_id=self._resolve(source))

    def remove_image(self, name):
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

    # -- IDockerBackend ----------------------------------------------------------------

    def negotiate(self):
        return self._call("negotiate", None, self._negotiate)

    def ping(self):
        return self._call("ping", None, lambda: None)

    def list_images(self):
        return self._call("list_images", None, self._summaries)

    def inspect_image(self, name):
        return self._call("inspect_image", name, lambda: self._inspect(self._resolve(name)))

    def stream_events(self, on_event, filters=None):
        self.calls.append(("stream_events", filters))
        stream = FakeEventStream(self, on_event, filters)
        if not self.available:
            stream.done = fail(DockerUnavailable("GET /events: daemon gone"))
        else:
            stream.done = Deferred()
            self._streams.append(stream)
        return stream

    def close(self):
        self.calls.append(("close", None))
        self.closed = True
        self.end_streams()
        return succeed(None)

    # -- internals --------------------------------------------------------------------

    def _call(self, name, argument, result):
        self.calls.append((name, argument))
        if not self.available:
            return fail(DockerUnavailable(f"{name}: daemon gone"))
        try:
            return succeed(result())
        except Exception as e:
            return fail(e)

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
        hex_prefix = name[len("sha256:"):] if name.startswith("sha256:") else name
        matches = [i for i in self._images if hex_prefix and i[len("sha256:"):].startswith(hex_prefix)]
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

    def _end_stream(self, stream, error):
        if stream not in self._streams:
            return
        self._streams.remove(stream)
        if error is None:
            stream.done.callback(None)
        else:
            stream.done.errback(error)
