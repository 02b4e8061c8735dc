"""
The Docker Engine API client the agent uses: Twisted-native, over treq, on the injected
reactor.

``DockerEngineClient`` speaks HTTP over the daemon's UNIX socket (or TCP) through one
connection pool. It negotiates the API version once (``GET /version``) and then prefixes
every call with ``/v{api}``; new endpoints (containers, exec, ...) are one call to the
private ``_request`` helper away.

Where the daemon listens is parsed in ``bai_agent.docker.address``; the streams it
answers with (multiplexed logs, JSON events) are decoded by ``bai_agent.docker.streams``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from collections.abc import Generator
from typing import Any, Callable, TypeVar
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bai_agent.docker.address import DockerAddress, parse_docker_host
from bai_agent.docker.interface import (
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
    IDockerBackend,
    IEventStream,
)
from bai_agent.docker.streams import (
    DockerStreamError,
    JSONStreamDecoder,
    JSONStreamError,
    demultiplex_docker_stream,
    whole_lines,
)

# ``DockerAddress`` and ``parse_docker_host`` are part of this client's API too.
__all__ = [
    "MIN_API_VERSION",
    "DockerAddress",
    "DockerEngineClient",
    "api_version_key",
    "container_path",
    "image_path",
    "label_filters",
    "parse_docker_host",
    "pick_api_version",
]

log = Logger()

#: The oldest Engine API the agent speaks (Docker 20.10).
MIN_API_VERSION = "1.41"
#: What a one-file archive may hold beyond the file (headers, PAX records, padding, end).
TAR_OVERHEAD = 64 * 1024

_API_VERSION_RE = re.compile(r"^\d+\.\d+\Z")


def api_version_key(version: object) -> tuple[int, int]:
    """``"1.41"`` -> ``(1, 41)``, for comparing; ``ValueError`` for anything else."""
    if not isinstance(version, str) or not _API_VERSION_RE.match(version):
        raise ValueError(f"not an API version: {version!r}")
    major, minor = version.split(".")
    return int(major), int(minor)


def pick_api_version(daemon_api_version: object, max_api_version: str) -> str:
    """
    The API version to speak: the daemon's, capped by ours. Raise ``DockerError`` when
    the daemon reports no usable version or one older than ``MIN_API_VERSION``.
    """
    try:
        daemon_key = api_version_key(daemon_api_version)
    except ValueError:
        raise DockerError(f"the daemon reports no usable ApiVersion: {daemon_api_version!r}") from None
    assert isinstance(daemon_api_version, str)  # api_version_key checked it
    chosen = daemon_api_version if daemon_key <= api_version_key(max_api_version) else max_api_version
    if api_version_key(chosen) < api_version_key(MIN_API_VERSION):
        raise DockerError(
            f"the Docker daemon speaks API {daemon_api_version}; "
            f"bai-agent needs {MIN_API_VERSION} or newer (Docker 20.10+)"
        )
    return chosen


def image_path(name: str, suffix: str = "") -> str:
    """``/images/{name}{suffix}`` with ``name`` quoted whole, slashes and colons included."""
    return "/images/" + quote(name, safe="") + suffix


def container_path(container_id: str, suffix: str = "") -> str:
    """``/containers/{id}{suffix}`` with the id (or name) quoted whole."""
    return "/containers/" + quote(container_id, safe="") + suffix


def file_stat(headers: Any, path: str) -> dict[str, Any]:
    """``{"regular", "size"}`` from the ``X-Docker-Container-Path-Stat`` header of an archive HEAD."""
    values = headers.getRawHeaders("X-Docker-Container-Path-Stat") or []
    try:
        stat = json.loads(base64.b64decode(values[0]))
        mode, size = int(stat["mode"]), int(stat["size"])
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise DockerError(f"the daemon gave no usable stat of {path}: {e}") from e
    # Go's os.FileMode: the type bits are the high ones; a regular file has none.
    return {"regular": mode & 0xFFF00000 == 0 and not stat.get("linkTarget"), "size": size}


def file_from_tar(body: bytes, path: str, max_bytes: int) -> bytes:
    """The one regular file of an archive the daemon sent for ``path``, at most ``max_bytes``."""
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as archive:
            member = archive.next()
            if member is None or not member.isreg():
                raise DockerError(f"the archive of {path} holds no regular file")
            if member.size > max_bytes:
                raise DockerError(f"{path} is {member.size} bytes, more than {max_bytes}")
            extracted = archive.extractfile(member)
            assert extracted is not None  # a regular member always has its data
            return extracted.read()
    except tarfile.TarError as e:
        raise DockerError(f"the daemon sent a bad archive of {path}: {e}") from e


def label_filters(labels: dict[str, str | None] | None) -> dict[str, list[str]]:
    """``{"k": "v", "p": None}`` -> ``{"label": ["k=v", "p"]}``, the ``filters`` of a listing."""
    if not labels:
        return {}
    return {"label": [key if value is None else f"{key}={value}" for key, value in labels.items()]}


@implementer(IAgentEndpointFactory)
class _FixedEndpointFactory:
    """Every URI goes to the daemon's address (the URL's host is only a placeholder)."""

    def __init__(self, reactor: Any, address: DockerAddress, timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        return self._address.endpoint(self._reactor, self._timeout)


def _as_docker_error(failure: Failure, what: str) -> Failure:
    """
    Translate a transport failure into ``DockerUnavailable``; keep ours, and keep a
    caller's cancellation a ``CancelledError`` (treq wraps it in ``ResponseNeverReceived``).
    """
    if failure.check(DockerError, CancelledError):
        return failure
    error = failure.value
    # ResponseFailed / ResponseNeverReceived / RequestTransmissionFailed wrap the reasons.
    reasons = [r.value for r in getattr(error, "reasons", None) or ()] or [error]
    if any(isinstance(r, (CancelledError, ConnectingCancelledError)) for r in reasons):
        return Failure(CancelledError(what))
    detail = "; ".join(str(r) or type(r).__name__ for r in reasons)
    raise DockerUnavailable(f"{what}: {detail}")


def _error_message(body: bytes, status: int) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    if not message:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return message


_ERROR_TYPES: dict[int, type[DockerError]] = {404: DockerNotFound, 409: DockerConflict}


def _error_for(status: int, body: bytes) -> DockerError:
    """The ``DockerError`` (or subclass) for an error answer, with the daemon's message."""
    return _ERROR_TYPES.get(status, DockerError)(_error_message(body, status), status=status)


#: What an ``inlineCallbacks`` generator that returns a ``T`` is.
T = TypeVar("T")
_Calls = Generator["Deferred[Any]", Any, T]

#: ``_request``'s ``timeout`` when not given: the client's own.
_CLIENT_TIMEOUT = object()


@implementer(IEventStream)
class _EventStream:
    """The ``IEventStream`` of ``DockerEngineClient.stream_events``."""

    def __init__(self, on_event: Callable[[Any], object], forget: Callable[[_EventStream], None]) -> None:
        self.done: Deferred[None] = Deferred()
        self._on_event = on_event
        self._forget = forget
        self._decoder = JSONStreamDecoder()
        self._request: Deferred[Any] | None = None  # the request, until the headers arrive
        self._transport: Any = None  # the body's transport once it streams
        self.cancelled = False

    def cancel(self) -> None:
        if self.done.called:
            return
        self.cancelled = True
        self._finish(None)  # first: what the cancellations below fail with is moot
        if self._transport is not None:
            self._transport.stopProducing()
        elif self._request is not None:
            self._request.cancel()

    def _finish(self, error: DockerError | None) -> None:
        """Fire ``done``: with None, or failed with ``error`` (a DockerError)."""
        if self.done.called:
            return
        self._forget(self)
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def _fail(self, error: BaseException) -> None:
        self._finish(error if isinstance(error, DockerError) else DockerError(str(error)))

    def _deliver(self, data: bytes) -> None:
        try:
            events = self._decoder.feed(data)
        except JSONStreamError as e:
            self._fail(DockerError(f"the events stream is not JSON: {e}"))
            self._transport.stopProducing()
            return
        for event in events:
            if self.cancelled or self.done.called:
                return
            try:
                self._on_event(event)
            except Exception:
                log.failure("an events consumer raised on {event!r}", event=event)


class _PullStream(_EventStream):
    """A pull's progress stream: an ``error`` inside it fails the pull (Docker answered 200)."""

    def _deliver(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except JSONStreamError as e:
            self._fail(DockerError(f"the pull's progress stream is not JSON: {e}"))
            self._transport.stopProducing()
            return
        for message in messages:
            if self.cancelled or self.done.called:
                return
            if isinstance(message, dict) and ("error" in message or "errorDetail" in message):
                detail = message.get("errorDetail")
                text = detail.get("message") if isinstance(detail, dict) else None
                self._fail(DockerError(str(text or message.get("error") or "the pull failed")))
                self._transport.stopProducing()
                return
            try:
                self._on_event(message)
            except Exception:
                log.failure("a pull's progress consumer raised on {message!r}", message=message)


class _EventBodyProtocol(Protocol):
    def __init__(self, stream: _EventStream) -> None:
        self._stream = stream

    def connectionMade(self) -> None:
        self._stream._transport = self.transport

    def dataReceived(self, data: bytes) -> None:
        self._stream._deliver(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        stream = self._stream
        if stream.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if stream._decoder.pending:
                stream._fail(DockerError("the stream ended inside a message"))
            else:
                stream._finish(None)
        else:
            stream._fail(DockerUnavailable(f"the stream broke: {reason.getErrorMessage()}"))


@implementer(IDockerBackend)
class DockerEngineClient:
    """
    ``IDockerBackend`` on the real daemon.

    :param reactor: provides ``IReactorTime`` and ``IReactorUNIX``/``IReactorTCP``.
    :param docker_host: ``unix:///path/to.sock`` or ``tcp://host:port``.
    :param max_api_version: the newest Engine API version this client speaks.
    :param timeout: seconds for connecting and for each (non-streaming) call.
    """

    def __init__(self, reactor: Any, docker_host: str, max_api_version: str = "1.43", timeout: float = 30.0) -> None:
        self._address = parse_docker_host(docker_host)
        api_version_key(max_api_version)  # ValueError on nonsense
        self.docker_host = docker_host
        self.max_api_version = max_api_version
        self.api_version: str | None = None
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent.usingEndpointFactory(
            reactor, _FixedEndpointFactory(reactor, self._address, timeout), pool=self._pool
        )
        self._http = HTTPClient(agent)
        self._streams: set[_EventStream] = set()

    def __repr__(self) -> str:
        return f"<DockerEngineClient {self.docker_host} api={self.api_version}>"

    # -- the generic request helper --------------------------------------------------

    def _url(self, path: str, versioned: bool) -> str:
        if versioned:
            path = f"/v{self.api_version}{path}"
        return self._address.base_url + path

    @inlineCallbacks
    def _ensure_negotiated(self) -> _Calls[None]:
        if self.api_version is None:
            yield self.negotiate()

    def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, str] | None = None,
        versioned: bool = True,
        decode: bool = True,
        accept: tuple[int, ...] = (),
        timeout: Any = _CLIENT_TIMEOUT,
        want_headers: bool = False,
        max_body: int | None = None,
    ) -> Deferred[Any]:
        """
        Send one request and read the whole answer. Fires with the decoded JSON body
        (None when empty), or the raw bytes with ``decode=False``. Versioned paths are
        prefixed with ``/v{api}`` (negotiating first when needed).

        A status outside 2xx fails with ``_error_for`` it (404 ``DockerNotFound``, 409
        ``DockerConflict``), except the statuses in ``accept`` (such as 304 "already
        started"), which fire with None. ``want_headers``: fire with the response's
        headers instead of its body. ``timeout``: seconds for the whole call, the
        client's own when not given, ``None`` for no limit (connecting is still bounded).
        ``max_body``: the most bytes of body read; a longer one is dropped, ``DockerError``.
        """
        what = f"{method} {path}"

        @inlineCallbacks
        def call() -> _Calls[Any]:
            if versioned:
                yield self._ensure_negotiated()
            log.debug("docker {what}", what=what)
            # treq sends ``json=None`` as a "null" body: pass it only when there is one.
            body_args = {} if json is None else {"json": json}
            response = yield self._http.request(method, self._url(path, versioned), params=params, **body_args)
            body = yield (response.content() if max_body is None else _bounded_body(response, max_body, what))
            if want_headers and 200 <= response.code < 300:
                return response.headers
            if response.code in accept:
                return None
            if not 200 <= response.code < 300:
                raise _error_for(response.code, body)
            if not decode:
                return body
            if not body.strip():
                return None
            try:
                return _decode_json(body)
            except ValueError as e:
                raise DockerError(f"{what}: the daemon answered invalid JSON: {e}") from e

        return self._guard(call(), what, timeout)

    def _guard(self, d: Deferred[Any], what: str, timeout: Any = _CLIENT_TIMEOUT) -> Deferred[Any]:
        """
        Cancel ``d`` after ``timeout`` seconds (the client's own when not given; never
        when None), and make its failures ``DockerError``s (a timeout is
        ``DockerUnavailable``).
        """
        if timeout is _CLIENT_TIMEOUT:
            timeout = self._timeout
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = None if timeout is None else self._reactor.callLater(timeout, expire)

        def settled(result: object) -> object:
            if timer is not None and timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                raise DockerUnavailable(f"{what}: no answer within {timeout:g}s")
            return result

        d.addBoth(settled)
        d.addErrback(_as_docker_error, what)
        return d

    # -- IDockerBackend -------------------------------------------------------------

    @inlineCallbacks
    def negotiate(self) -> _Calls[dict[str, Any]]:
        version = yield self._request("GET", "/version", versioned=False)
        if not isinstance(version, dict):
            raise DockerError(f"GET /version answered {version!r}")
        self.api_version = pick_api_version(version.get("ApiVersion"), self.max_api_version)
        log.info(
            "Docker {daemon_version} at {docker_host}: speaking API {api_version}",
            daemon_version=version.get("Version"),
            docker_host=self.docker_host,
            api_version=self.api_version,
        )
        return version

    @inlineCallbacks
    def ping(self) -> _Calls[None]:
        yield self._request("GET", "/_ping", versioned=False, decode=False)

    def list_images(self) -> Deferred[Any]:
        return self._request("GET", "/images/json")

    def inspect_image(self, name: str) -> Deferred[Any]:
        return self._request("GET", image_path(name, "/json"))

    def stream_events(self, on_event: Callable[[Any], object], filters: dict[str, Any] | None = None) -> _EventStream:
        """
        Open ``GET /events``; see ``IDockerBackend.stream_events``. The timeout covers
        opening the stream, not its lifetime. An exception raised by ``on_event`` is
        logged and the stream goes on.
        """
        params = {"filters": json.dumps(filters, separators=(",", ":"))} if filters else None
        return self._stream("GET", "/events", params, {}, _EventStream(on_event, self._streams.discard))

    def pull_image(self, reference: str, auth: str | None, on_progress: Callable[[Any], object]) -> _EventStream:
        """``POST /images/create``; see ``IDockerBackend.pull_image``."""
        stream = _PullStream(on_progress, self._streams.discard)
        headers = {} if auth is None else {"X-Registry-Auth": [auth]}
        return self._stream("POST", "/images/create", {"fromImage": reference}, headers, stream)

    @inlineCallbacks
    def remove_image(self, name: str) -> _Calls[None]:
        yield self._request("DELETE", image_path(name))

    def _stream(
        self, method: str, path: str, params: dict[str, str] | None, headers: dict[Any, Any], stream: _EventStream
    ) -> _EventStream:
        """Open a request whose answer is a JSON stream, delivered to ``stream`` as it comes."""
        self._streams.add(stream)
        what = f"{method} {path}"

        @inlineCallbacks
        def open_stream() -> _Calls[Any]:
            yield self._ensure_negotiated()
            if stream.cancelled:
                return None
            url = self._url(path, True)
            return (yield self._http.request(method, url, params=params, headers=headers, unbuffered=True))

        def opened(response: Any) -> Deferred[Any] | None:
            stream._request = None
            if response is None or stream.done.called:
                return None
            if not 200 <= response.code < 300:
                d = response.content()
                d.addCallback(lambda body: stream._fail(_error_for(response.code, body)))
                return d
            response.deliverBody(_EventBodyProtocol(stream))
            return None

        def failed(failure: Failure) -> None:
            stream._request = None
            if not stream.done.called:
                stream._fail(failure.value or DockerError(f"{what} failed"))

        d = self._guard(open_stream(), what)
        stream._request = d
        d.addCallbacks(opened, failed)
        d.addErrback(failed)
        return stream

    # -- containers -------------------------------------------------------------------

    @inlineCallbacks
    def create_container(self, name: str | None, config: dict[str, Any]) -> _Calls[str]:
        params = None if name is None else {"name": name}
        created = yield self._request("POST", "/containers/create", json=config, params=params)
        if not isinstance(created, dict) or not created.get("Id"):
            raise DockerError(f"POST /containers/create answered {created!r}")
        for warning in created.get("Warnings") or ():
            log.warn("creating container {name}: the daemon warns: {warning}", name=name, warning=warning)
        return created["Id"]

    @inlineCallbacks
    def start_container(self, container_id: str) -> _Calls[None]:
        yield self._request("POST", container_path(container_id, "/start"), accept=(304,))

    def inspect_container(self, container_id: str) -> Deferred[Any]:
        return self._request("GET", container_path(container_id, "/json"))

    def list_containers(self, labels: dict[str, str | None] | None = None, all: bool = True) -> Deferred[Any]:
        params = {"all": "1" if all else "0"}
        filters = label_filters(labels)
        if filters:
            params["filters"] = json.dumps(filters, separators=(",", ":"))
        return self._request("GET", "/containers/json", params=params)

    @inlineCallbacks
    def kill_container(self, container_id: str, signal: object = "SIGKILL") -> _Calls[None]:
        yield self._request("POST", container_path(container_id, "/kill"), params={"signal": str(signal)})

    @inlineCallbacks
    def stop_container(self, container_id: str, timeout: float = 10) -> _Calls[None]:
        # The daemon answers only once the container has stopped: up to ``timeout``
        # seconds of grace, then the time SIGKILL takes.
        yield self._request(
            "POST",
            container_path(container_id, "/stop"),
            params={"t": str(int(timeout))},
            accept=(304,),
            timeout=self._timeout + timeout,
        )

    @inlineCallbacks
    def remove_container(self, container_id: str, force: bool = True, volumes: bool = True) -> _Calls[None]:
        yield self._request(
            "DELETE",
            container_path(container_id),
            params={"force": "1" if force else "0", "v": "1" if volumes else "0"},
        )

    @inlineCallbacks
    def wait_container(self, container_id: str) -> _Calls[int]:
        path = container_path(container_id, "/wait")
        result = yield self._request("POST", path, params={"condition": "not-running"}, timeout=None)
        if not isinstance(result, dict) or not isinstance(result.get("StatusCode"), int):
            raise DockerError(f"POST {path} answered {result!r}")
        error = (result.get("Error") or {}).get("Message")
        if error:
            log.warn(
                "waiting for container {container_id}: the daemon reports: {error}",
                container_id=container_id,
                error=error,
            )
        return result["StatusCode"]

    @inlineCallbacks
    def container_logs(self, container_id: str, tail: int | None = None) -> _Calls[str]:
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise DockerError(f"tail must be None or a non-negative integer, not {tail!r}")
        # Without a TTY the daemon multiplexes stdout and stderr; with one it sends the
        # terminal's raw bytes, and only the container's config tells which.
        info = yield self.inspect_container(container_id)
        path = container_path(container_id, "/logs")
        body = yield self._request(
            "GET",
            path,
            params={"stdout": "1", "stderr": "1", "tail": "all" if tail is None else str(tail)},
            decode=False,
        )
        if (info.get("Config") or {}).get("Tty"):
            return body.decode("utf-8", "replace")
        try:
            output = whole_lines(demultiplex_docker_stream(body))
        except DockerStreamError as e:
            raise DockerError(f"GET {path}: {e}") from e
        # Join before decoding: a UTF-8 character may straddle two frames.
        return b"".join(payload for _, payload in output).decode("utf-8", "replace")

    @inlineCallbacks
    def read_file(self, container_id: str, path: str, max_bytes: int) -> _Calls[bytes]:
        # The stat header comes first (a HEAD reads no file), so that a huge or strange
        # file is refused before a byte of it travels.
        archive = container_path(container_id, "/archive")
        stat = yield self._request("HEAD", archive, params={"path": path}, decode=False, want_headers=True)
        info = file_stat(stat, path)
        if not info["regular"]:
            raise DockerError(f"{path} in container {container_id[:12]} is not a regular file")
        if info["size"] > max_bytes:
            raise DockerError(f"{path} in container {container_id[:12]} is {info['size']} bytes, more than {max_bytes}")
        # The file may have grown since the stat: the archive read is bounded too.
        bound = max_bytes + TAR_OVERHEAD
        body = yield self._request("GET", archive, params={"path": path}, decode=False, max_body=bound)
        return file_from_tar(body, path, max_bytes)

    @inlineCallbacks
    def rename_container(self, container_id: str, name: str) -> _Calls[None]:
        yield self._request("POST", container_path(container_id, "/rename"), params={"name": name})

    @inlineCallbacks
    def update_container(self, container_id: str, resources: dict[str, Any]) -> _Calls[list[str]]:
        result = yield self._request("POST", container_path(container_id, "/update"), json=resources)
        return list((result or {}).get("Warnings") or ())

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Cancel open event streams and close pooled connections; fires when closed."""
        for stream in list(self._streams):
            stream.cancel()
        return self._pool.closeCachedConnections()


def _bounded_body(response: Any, max_body: int, what: str) -> Deferred[bytes]:
    """The body of ``response``, or ``DockerError`` (the connection dropped) past ``max_body`` bytes."""
    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > max_body:
            raise DockerError(f"{what}: the daemon's answer is over {max_body} bytes")
        chunks.append(data)

    return response.collect(collect).addCallback(lambda _: b"".join(chunks))


# ``_request`` takes a ``json`` argument, as treq does; this keeps the module in reach.
_decode_json = json.loads
