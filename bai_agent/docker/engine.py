"""
The Docker Engine API client the agent uses: Twisted-native, over treq, on the injected
reactor.

``DockerEngineClient`` speaks HTTP over the daemon's UNIX socket (or TCP) through one
connection pool. It negotiates the API version once (``GET /version``) and then prefixes
every call with ``/v{api}``; new endpoints (containers, exec, ...) are one call to the
private ``_request`` helper away.

``demultiplex_docker_stream`` / ``DockerStreamDemultiplexer`` split the multiplexed
stdout/stderr stream of containers without a TTY (logs, attach, exec).
"""

import json
import re
from typing import Optional
from urllib.parse import quote, urlsplit

import attr
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bai_agent.docker.interface import (
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
    IDockerBackend,
    IEventStream,
)

log = Logger()

#: The oldest Engine API the agent speaks (Docker 20.10).
MIN_API_VERSION = "1.41"

_API_VERSION_RE = re.compile(r"^\d+\.\d+\Z")


def api_version_key(version):
    """``"1.41"`` -> ``(1, 41)``, for comparing; ``ValueError`` for anything else."""
    if not isinstance(version, str) or not _API_VERSION_RE.match(version):
        raise ValueError(f"not an API version: {version!r}")
    major, minor = version.split(".")
    return int(major), int(minor)


def pick_api_version(daemon_api_version, max_api_version):
    """
    The API version to speak: the daemon's, capped by ours. Raise ``DockerError`` when
    the daemon reports no usable version or one older than ``MIN_API_VERSION``.
    """
    try:
        daemon_key = api_version_key(daemon_api_version)
    except ValueError:
        raise DockerError(f"the daemon reports no usable ApiVersion: {daemon_api_version!r}")
    chosen = daemon_api_version if daemon_key <= api_version_key(max_api_version) else max_api_version
    if api_version_key(chosen) < api_version_key(MIN_API_VERSION):
        raise DockerError(
            f"the Docker daemon speaks API {daemon_api_version}; "
            f"bai-agent needs {MIN_API_VERSION} or newer (Docker 20.10+)"
        )
    return chosen


@attr.frozen
class DockerAddress:
    """A parsed ``DOCKER_HOST``: ``unix`` with ``path``, or ``tcp`` with ``host`` and ``port``."""

    scheme: str
    path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None

    def endpoint(self, reactor, timeout):
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)

    @property
    def base_url(self):
        """The URL prefix requests use; for UNIX sockets the host part is a placeholder."""
        if self.scheme == "unix":
            return "http://docker"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_docker_host(docker_host):
    """
    Parse ``unix:///abs/path.sock`` or ``tcp://host:port`` into a ``DockerAddress``.
    Anything else raises ``ValueError`` naming the value.
    """

    def bad(why):
        return ValueError(f"invalid docker host {docker_host!r}: {why}")

    if not isinstance(docker_host, str) or not docker_host:
        raise bad("expected unix:///path/to.sock or tcp://host:port")
    if docker_host.startswith("unix://"):
        path = docker_host[len("unix://") :]
        if not path.startswith("/"):
            raise bad("the socket path must be absolute (unix:///path/to.sock)")
        if "\0" in path:
            raise bad("the socket path contains a NUL byte")
        return DockerAddress(scheme="unix", path=path)
    if docker_host.startswith("tcp://"):
        parts = urlsplit(docker_host)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise bad("expected tcp://host:port with nothing after the port")
        try:
            port = parts.port
        except ValueError:
            raise bad("the port must be a number from 1 to 65535")
        if not parts.hostname:
            raise bad("no host")
        if port is None or port == 0:
            raise bad("expected tcp://host:port with a port from 1 to 65535")
        return DockerAddress(scheme="tcp", host=parts.hostname, port=port)
    raise bad("expected unix:///path/to.sock or tcp://host:port")


def image_path(name, suffix=""):
    """``/images/{name}{suffix}`` with ``name`` quoted whole, slashes and colons included."""
    return "/images/" + quote(name, safe="") + suffix


def container_path(container_id, suffix=""):
    """``/containers/{id}{suffix}`` with the id (or name) quoted whole."""
    return "/containers/" + quote(container_id, safe="") + suffix


def label_filters(labels):
    """``{"k": "v", "p": None}`` -> ``{"label": ["k=v", "p"]}``, the ``filters`` of a listing."""
    if not labels:
        return {}
    return {"label": [key if value is None else f"{key}={value}" for key, value in labels.items()]}


# -- the multiplexed stdout/stderr stream ------------------------------------------------

#: The stream byte of a multiplexed frame's header, and what it names.
DOCKER_STREAM_NAMES = {0: "stdin", 1: "stdout", 2: "stderr"}

_FRAME_HEADER_SIZE = 8


class DockerStreamError(ValueError):
    """The bytes are not Docker's multiplexed stream (a frame header is invalid)."""


class DockerStreamDemultiplexer:
    """
    Incremental demultiplexer of the stream Docker sends for a container without a TTY:
    frames of an 8-byte header ``[stream, 0, 0, 0, size as big-endian uint32]`` and
    ``size`` bytes of output, where stream is 0 (stdin), 1 (stdout) or 2 (stderr).

    ``feed`` takes chunks cut anywhere, even inside a header, and returns the output
    they completed as ``[(stream_name, bytes)]``: a frame's bytes are passed on as soon
    as they arrive (an interactive consumer sees output without waiting for the rest of
    the frame), and consecutive bytes of the same stream within one ``feed`` are joined.
    """

    def __init__(self):
        self._header = bytearray()
        self._stream = None  # the stream of the frame whose payload is arriving
        self._remaining = 0  # payload bytes of that frame still to come
        self._offset = 0  # bytes consumed so far, for error messages

    @property
    def pending(self):
        """True when the stream stopped inside a frame (a truncated stream)."""
        return bool(self._header) or self._remaining > 0

    def feed(self, data):
        out = []
        view = memoryview(data)
        i, end = 0, len(view)
        while i < end:
            if self._remaining:
                take = min(self._remaining, end - i)
                _append_output(out, self._stream, view[i : i + take])
                self._remaining -= take
                i += take
                continue
            start = len(self._header)
            piece = view[i : i + _FRAME_HEADER_SIZE - start]
            self._header += piece
            self._check_header(start)
            i += len(piece)
            if len(self._header) == _FRAME_HEADER_SIZE:
                self._stream = DOCKER_STREAM_NAMES[self._header[0]]
                self._remaining = int.from_bytes(self._header[4:], "big")
                self._offset += _FRAME_HEADER_SIZE + self._remaining
                self._header.clear()
        return [(name, bytes(payload)) for name, payload in out]

    def _check_header(self, checked):
        """Validate the header bytes from ``checked`` on, as soon as they arrive."""
        header = self._header
        for index in range(checked, min(len(header), 4)):
            if (index == 0 and header[0] not in DOCKER_STREAM_NAMES) or (index and header[index]):
                raise DockerStreamError(
                    f"not a multiplexed stream: invalid frame header at byte {self._offset}: {bytes(header)!r}"
                )


def _append_output(out, name, payload):
    if out and out[-1][0] == name:
        out[-1][1].extend(payload)
    else:
        out.append((name, bytearray(payload)))


def demultiplex_docker_stream(data):
    """
    Split Docker's multiplexed stream (see ``DockerStreamDemultiplexer``) into
    ``[(stream_name, bytes)]`` in the order written, ``stream_name`` being ``"stdin"``,
    ``"stdout"`` or ``"stderr"``. Consecutive output of one stream is joined into one
    item, so the result does not depend on how the writer framed it. A final frame cut
    short gives the bytes that did arrive; a final header cut short gives nothing.
    Raise ``DockerStreamError`` (a ``ValueError``) at a header that is not
    ``[0|1|2, 0, 0, 0, size]``, e.g. for the raw output of a container with a TTY.
    """
    return DockerStreamDemultiplexer().feed(data)


def whole_lines(output):
    """
    Regroup demultiplexed ``output`` (``[(stream_name, bytes)]``) so that no line of
    one stream is cut by output of another: each stream's bytes are held until a
    newline, and each line goes where its last byte came. The daemon logs a long line
    in 16 KiB pieces, and the pieces of stdout and stderr lines written close together
    interleave; this keeps them whole. A stream's unfinished last line comes at the end.
    """
    pending = {}  # stream -> bytes held back, in the order they started
    out = []
    for stream, payload in output:
        if not payload:
            continue
        held = pending.setdefault(stream, bytearray())
        held += payload
        end = held.rfind(b"\n") + 1
        if end:
            _append_output(out, stream, held[:end])
            del held[:end]
            if not held:
                del pending[stream]
    for stream, rest in pending.items():
        _append_output(out, stream, rest)
    return [(stream, bytes(payload)) for stream, payload in out]


class JSONStreamError(ValueError):
    """The stream is not a sequence of JSON objects/arrays."""


class JSONStreamDecoder:
    """
    Incremental decoder for a byte stream of concatenated JSON objects or arrays (the
    shape of Docker's ``/events`` and progress streams), fed chunks cut at arbitrary
    points, even inside a string or a multi-byte UTF-8 character.

    It scans each byte once, tracking nesting depth and whether it is inside a string;
    a value is decoded only when its closing bracket has arrived. Scanning the raw
    bytes is safe because UTF-8 continuation bytes never look like ASCII brackets,
    quotes or backslashes.
    """

    _STRUCTURE = re.compile(rb'[{}\[\]"]')
    _STRING_SPECIAL = re.compile(rb'["\\]')
    _NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")

    def __init__(self, max_value_size=16 * 1024 * 1024):
        self._buffer = bytearray()
        self._scan = 0  # first byte not yet scanned
        self._depth = 0
        self._in_string = False
        self._max_value_size = max_value_size

    def feed(self, data):
        """Add ``data`` (bytes); return the list of values it completed, in order."""
        buf = self._buffer
        buf += data
        values = []
        start = 0  # where the value being scanned begins (meaningful when depth > 0)
        i = self._scan
        end = len(buf)
        while i < end:
            if self._in_string:
                m = self._STRING_SPECIAL.search(buf, i)
                if m is None:
                    i = end
                elif buf[m.start()] == 0x5C:  # backslash: skip the escaped byte
                    if m.start() + 1 >= end:
                        i = m.start()  # rescan the backslash when more arrives
                        break
                    i = m.start() + 2
                else:
                    self._in_string = False
                    i = m.end()
            elif self._depth == 0:
                m = self._NOT_WHITESPACE.search(buf, i)
                if m is None:
                    i = end
                elif buf[m.start()] in b"{[":
                    start = m.start()
                    self._depth = 1
                    i = m.end()
                else:
                    raise JSONStreamError(f"expected a JSON object, found {bytes(buf[m.start() : m.start() + 20])!r}")
            else:
                m = self._STRUCTURE.search(buf, i)
                if m is None:
                    i = end
                    continue
                byte = buf[m.start()]
                i = m.end()
                if byte == 0x22:  # '"'
                    self._in_string = True
                elif byte in b"{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        values.append(self._decode(bytes(buf[start:i])))
                        start = i
        # Keep only the unfinished value (or nothing) and where scanning stopped in it.
        keep_from = start if self._depth or self._in_string else i
        del buf[:keep_from]
        self._scan = i - keep_from
        if len(buf) > self._max_value_size:
            raise JSONStreamError(f"a JSON value is larger than {self._max_value_size} bytes")
        return values

    def _decode(self, raw):
        try:
            return json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise JSONStreamError(f"invalid JSON in stream: {e}") from None

    @property
    def pending(self):
        """True when the stream stopped inside a value (a truncated stream)."""
        return self._depth > 0 or self._in_string


@implementer(IAgentEndpointFactory)
class _FixedEndpointFactory:
    """Every URI goes to the daemon's address (the URL's host is only a placeholder)."""

    def __init__(self, reactor, address, timeout):
        self._reactor = reactor
        self._address = address
        self._timeout = timeout

    def endpointForURI(self, uri):
        return self._address.endpoint(self._reactor, self._timeout)


def _as_docker_error(failure, what):
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


def _error_message(body, status):
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    if not message:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return message


_ERROR_TYPES = {404: DockerNotFound, 409: DockerConflict}


def _error_for(status, body):
    """The ``DockerError`` (or subclass) for an error answer, with the daemon's message."""
    return _ERROR_TYPES.get(status, DockerError)(_error_message(body, status), status=status)


#: ``_request``'s ``timeout`` when not given: the client's own.
_CLIENT_TIMEOUT = object()


@implementer(IEventStream)
class _EventStream:
    """The ``IEventStream`` of ``DockerEngineClient.stream_events``."""

    def __init__(self, on_event, forget):
        self.done = Deferred()
        self._on_event = on_event
        self._forget = forget
        self._decoder = JSONStreamDecoder()
        self._request = None  # the Deferred of the request until the headers arrive
        self._transport = None  # the body's transport once it streams
        self.cancelled = False

    def cancel(self):
        if self.done.called:
            return
        self.cancelled = True
        self._finish(None)  # first: what the cancellations below fail with is moot
        if self._transport is not None:
            self._transport.stopProducing()
        elif self._request is not None:
            self._request.cancel()

    def _finish(self, error):
        """Fire ``done``: with None, or failed with ``error`` (a DockerError)."""
        if self.done.called:
            return
        self._forget(self)
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def _fail(self, error):
        self._finish(error if isinstance(error, DockerError) else DockerError(str(error)))

    def _deliver(self, data):
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


class _EventBodyProtocol(Protocol):
    def __init__(self, stream):
        self._stream = stream

    def connectionMade(self):
        self._stream._transport = self.transport

    def dataReceived(self, data):
        self._stream._deliver(data)

    def connectionLost(self, reason):
        stream = self._stream
        if stream.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if stream._decoder.pending:
                stream._fail(DockerError("the events stream ended inside an event"))
            else:
                stream._finish(None)
        else:
            stream._fail(DockerUnavailable(f"the events stream broke: {reason.getErrorMessage()}"))


@implementer(IDockerBackend)
class DockerEngineClient:
    """
    ``IDockerBackend`` on the real daemon.

    :param reactor: provides ``IReactorTime`` and ``IReactorUNIX``/``IReactorTCP``.
    :param docker_host: ``unix:///path/to.sock`` or ``tcp://host:port``.
    :param max_api_version: the newest Engine API version this client speaks.
    :param timeout: seconds for connecting and for each (non-streaming) call.
    """

    def __init__(self, reactor, docker_host, max_api_version="1.43", timeout=30.0):
        self._address = parse_docker_host(docker_host)
        api_version_key(max_api_version)  # ValueError on nonsense
        self.docker_host = docker_host
        self.max_api_version = max_api_version
        self.api_version = None
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent.usingEndpointFactory(
            reactor, _FixedEndpointFactory(reactor, self._address, timeout), pool=self._pool
        )
        self._http = HTTPClient(agent)
        self._streams = set()

    def __repr__(self):
        return f"<DockerEngineClient {self.docker_host} api={self.api_version}>"

    # -- the generic request helper --------------------------------------------------

    def _url(self, path, versioned):
        if versioned:
            path = f"/v{self.api_version}{path}"
        return self._address.base_url + path

    @inlineCallbacks
    def _ensure_negotiated(self):
        if self.api_version is None:
            yield self.negotiate()

    def _request(
        self,
        method,
        path,
        json=None,
        params=None,
        versioned=True,
        decode=True,
        accept=(),
        timeout=_CLIENT_TIMEOUT,
    ):
        """
        Send one request and read the whole answer. Fires with the decoded JSON body
        (None when empty), or the raw bytes with ``decode=False``. Versioned paths are
        prefixed with ``/v{api}`` (negotiating first when needed).

        A status outside 2xx fails with ``_error_for`` it (404 ``DockerNotFound``, 409
        ``DockerConflict``), except the statuses in ``accept`` (such as 304 "already
        started"), which fire with None. ``timeout``: seconds for the whole call, the
        client's own when not given, ``None`` for no limit (connecting is still bounded).
        """
        what = f"{method} {path}"

        @inlineCallbacks
        def call():
            if versioned:
                yield self._ensure_negotiated()
            log.debug("docker {what}", what=what)
            # treq sends ``json=None`` as a "null" body: pass it only when there is one.
            body_args = {} if json is None else {"json": json}
            response = yield self._http.request(method, self._url(path, versioned), params=params, **body_args)
            body = yield response.content()
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
                raise DockerError(f"{what}: the daemon answered invalid JSON: {e}")

        return self._guard(call(), what, timeout)

    def _guard(self, d, what, timeout=_CLIENT_TIMEOUT):
        """
        Cancel ``d`` after ``timeout`` seconds (the client's own when not given; never
        when None), and make its failures ``DockerError``s (a timeout is
        ``DockerUnavailable``).
        """
        if timeout is _CLIENT_TIMEOUT:
            timeout = self._timeout
        timed_out = []

        def expire():
            timed_out.append(True)
            d.cancel()

        timer = None if timeout is None else self._reactor.callLater(timeout, expire)

        def settled(result):
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
    def negotiate(self):
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
    def ping(self):
        yield self._request("GET", "/_ping", versioned=False, decode=False)

    def list_images(self):
        return self._request("GET", "/images/json")

    def inspect_image(self, name):
        return self._request("GET", image_path(name, "/json"))

    def stream_events(self, on_event, filters=None):
        """
        Open ``GET /events``; see ``IDockerBackend.stream_events``. The timeout covers
        opening the stream, not its lifetime. An exception raised by ``on_event`` is
        logged and the stream goes on.
        """
        stream = _EventStream(on_event, self._streams.discard)
        self._streams.add(stream)
        params = {"filters": json.dumps(filters, separators=(",", ":"))} if filters else None

        @inlineCallbacks
        def open_stream():
            yield self._ensure_negotiated()
            if stream.cancelled:
                return None
            return (yield self._http.request("GET", self._url("/events", True), params=params, unbuffered=True))

        def opened(response):
            stream._request = None
            if response is None or stream.done.called:
                return None
            if not 200 <= response.code < 300:
                d = response.content()
                d.addCallback(lambda body: stream._fail(_error_for(response.code, body)))
                return d
            response.deliverBody(_EventBodyProtocol(stream))
            return None

        def failed(failure):
            stream._request = None
            if not stream.done.called:
                stream._fail(failure.value)

        d = self._guard(open_stream(), "GET /events")
        stream._request = d
        d.addCallbacks(opened, failed)
        d.addErrback(failed)
        return stream

    # -- containers -------------------------------------------------------------------

    @inlineCallbacks
    def create_container(self, name, config):
        params = None if name is None else {"name": name}
        created = yield self._request("POST", "/containers/create", json=config, params=params)
        if not isinstance(created, dict) or not created.get("Id"):
            raise DockerError(f"POST /containers/create answered {created!r}")
        for warning in created.get("Warnings") or ():
            log.warn("creating container {name}: the daemon warns: {warning}", name=name, warning=warning)
        return created["Id"]

    @inlineCallbacks
    def start_container(self, container_id):
        yield self._request("POST", container_path(container_id, "/start"), accept=(304,))

    def inspect_container(self, container_id):
        return self._request("GET", container_path(container_id, "/json"))

    def list_containers(self, labels=None, all=True):
        params = {"all": "1" if all else "0"}
        filters = label_filters(labels)
        if filters:
            params["filters"] = json.dumps(filters, separators=(",", ":"))
        return self._request("GET", "/containers/json", params=params)

    @inlineCallbacks
    def kill_container(self, container_id, signal="SIGKILL"):
        yield self._request("POST", container_path(container_id, "/kill"), params={"signal": str(signal)})

    @inlineCallbacks
    def stop_container(self, container_id, timeout=10):
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
    def remove_container(self, container_id, force=True, volumes=True):
        yield self._request(
            "DELETE",
            container_path(container_id),
            params={"force": "1" if force else "0", "v": "1" if volumes else "0"},
        )

    @inlineCallbacks
    def wait_container(self, container_id):
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
    def container_logs(self, container_id, tail=None):
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
            raise DockerError(f"GET {path}: {e}")
        # Join before decoding: a UTF-8 character may straddle two frames.
        return b"".join(payload for _, payload in output).decode("utf-8", "replace")

    @inlineCallbacks
    def update_container(self, container_id, resources):
        result = yield self._request("POST", container_path(container_id, "/update"), json=resources)
        return list((result or {}).get("Warnings") or ())

    # -- lifetime ---------------------------------------------------------------------

    def close(self):
        """Cancel open event streams and close pooled connections; fires when closed."""
        for stream in list(self._streams):
            stream.cancel()
        return self._pool.closeCachedConnections()


# ``_request`` takes a ``json`` argument, as treq does; this keeps the module in reach.
_decode_json = json.loads
