"""
A stand-in Docker daemon: a ``twisted.web`` resource that answers the Engine API the way
dockerd does, for tests of the Engine API client (``DockerEngineClient``) that need real
HTTP over a real socket but no daemon. Serve it with ``Site(StandInDaemon(reactor))`` on a
UNIX socket (``reactor.listenUNIX``).

It answers ``GET /version`` itself (with ``api_version``), holds ``/events`` requests open
for the test to write to, and answers everything else from ``routes``. It records every
request, in the shapes tests compare against.
"""

import json
from typing import Any
from urllib.parse import unquote

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["StandInDaemon"]


class StandInDaemon(Resource):
    """
    ``routes`` maps ``(method, path)``, or a bare ``path`` for any method, to
    ``(status, body)`` (a body that is not bytes is sent as JSON) or to
    ``(status, body, delay)`` to answer ``delay`` seconds later; an unknown path is a 404
    with dockerd's message. Paths are unquoted, without the query.

    Records: ``requests``, ``(method, raw URI)`` of each; ``bodies``, ``(content type,
    raw body)`` of each; ``calls``, ``(method, path, query arguments, JSON body or None)``
    of each (``last()`` is the latest); ``event_requests``, the open ``/events`` requests.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTime, api_version: str = "1.41", version: str = "20.10.99") -> None:
        super().__init__()
        self.reactor = reactor
        self.api_version = api_version
        self.version = version
        self.routes: dict[Any, tuple[Any, ...]] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str | None, bytes]] = []
        self.calls: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.event_requests: list[Request] = []

    def last(self) -> tuple[str, str, dict[str, list[str]], Any]:
        """The latest request, as ``(method, path, query arguments, JSON body or None)``."""
        return self.calls[-1]

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        assert request.method is not None and request.uri is not None and request.content is not None
        method = request.method.decode()
        path = _unquoted_path(request)
        body = request.content.read()
        self.requests.append((method, request.uri.decode()))
        self.bodies.append((request.getHeader("content-type"), body))
        args = {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()}
        self.calls.append((method, path, args, _json_or_raw(body)))
        if path == "/version":
            return _json(request, {"Version": self.version, "ApiVersion": self.api_version})
        if path.endswith("/events"):
            request.setHeader(b"content-type", b"application/json")
            request.write(b"")  # headers now, as dockerd flushes them
            self.event_requests.append(request)
            return NOT_DONE_YET
        route = self.routes.get((method, path), self.routes.get(path))
        if route is None:
            return _json(request, {"message": f"page not found: {path}"}, 404)
        status, answer, *delay = route
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        request.setResponseCode(status)
        if not delay:
            return data if status != 304 else b""

        def later() -> None:
            request.write(data)
            request.finish()

        def gone(reason: object) -> None:
            if call.active():
                call.cancel()

        call = self.reactor.callLater(delay[0], later)
        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


def _unquoted_path(request: Request) -> str:
    assert request.path is not None
    return unquote(request.path.decode())


def _json_or_raw(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def _json(request: Request, doc: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc).encode()
