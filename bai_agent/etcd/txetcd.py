"""
``IEtcd`` on a real etcd, through txaioetcd and etcd's JSON gRPC gateway.

txaioetcd 18.10.2 builds the requests (``KeySet``, ``Transaction``, ``OpSet`` ...) and parses
the answers (``Range``, ``Deleted``, ``Lease`` ...), but three of its habits do not fit here:

- it hard-codes the ``/v3alpha/`` gateway prefix, which etcd 3.4+ no longer serves, so the
  prefix is probed once (``/v3``, then ``/v3beta``, then ``/v3alpha``) and rewritten;
- it posts with treq's module-level functions, that is on the global reactor, so every
  request goes through an ``HTTPClient`` built on the injected reactor instead;
- its watch parser splits JSON per received chunk and loses documents cut across chunks,
  and its ``Lease`` methods bypass the client, so keep-alive, revoke and watch are done
  here on the same ``HTTPClient``.

Keys and values are base64 in the gateway's JSON; lease ids are int64 and travel as JSON
numbers (the gateway answers them as strings).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from typing import Any

import attrs
import txaioetcd
from treq.client import HTTPClient
from twisted.internet import error as internet_error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.defer import (
    TimeoutError as DeferredTimeoutError,
)
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from bai_agent.etcd.interface import (
    EtcdError,
    EtcdUnavailable,
    IEtcd,
    IWatch,
    LeaseNotFound,
    WatchCallback,
)

# A gateway's answer: a JSON object.
Document = dict[str, Any]

GATEWAY_PREFIXES = ("/v3", "/v3beta", "/v3alpha")
TXAIOETCD_PREFIX = "/v3alpha"

# The lease paths of etcd 3.4's gateway: keep-alive is a (one message) stream under
# /lease/, revoke is still served under /kv/lease/ (3.4 also has /lease/revoke).
KEEPALIVE_PATH = "/lease/keepalive"
REVOKE_PATH = "/kv/lease/revoke"
STATUS_PATH = "/maintenance/status"
WATCH_PATH = "/watch"

# gRPC status codes that mean "try again later" rather than "you asked wrongly".
_GRPC_UNAVAILABLE = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_LEASE_NOT_FOUND = "requested lease not found"

# A watch line longer than this is not a gateway document; stop rather than buffer forever.
MAX_WATCH_LINE = 64 * 1024 * 1024

_TRANSPORT_FAILURES = (
    internet_error.ConnectError,
    internet_error.ConnectionLost,
    internet_error.ConnectionDone,
    internet_error.TimeoutError,
    internet_error.DNSLookupError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestNotSent,
    RequestTransmissionFailed,
    DeferredTimeoutError,
)


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory (treq's default goes through the global cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _failure(error: BaseException) -> Failure:
    """``Failure(error)``, typed."""
    return Failure(error)  # type: ignore[no-untyped-call]


def _gateway_error(document: Document, where: str) -> EtcdError:
    """The ``EtcdError`` for a gateway error document (``{"error":..., "code":...}``)."""
    problem = document.get("error")
    code = document.get("code")
    if isinstance(problem, dict):  # errors inside a stream: {"error": {"grpc_code":...}}
        code = problem.get("grpc_code", code)
        message = problem.get("message") or json.dumps(problem)
    else:
        message = document.get("message") or problem or "unknown error"
    if _LEASE_NOT_FOUND in str(message):
        return LeaseNotFound(f"{where}: {message}")
    if code in _GRPC_UNAVAILABLE:
        return EtcdUnavailable(f"{where}: {message} (code {code})")
    return EtcdError(f"{where}: {message} (code {code})")


def _as_etcd_error(failure: Failure, where: str) -> Failure:
    """Let EtcdError and caller cancellation through; wrap anything else."""
    if isinstance(failure.value, (EtcdError, CancelledError)):
        return failure
    kind = type(failure.value).__name__
    return _failure(EtcdError(f"{where}: unexpected {kind}: {failure.getErrorMessage()}"))


def _describe(failure: Failure) -> str:
    """A short reason for a transport failure (ResponseFailed carries a list of them)."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe(reason) for reason in reasons)
    return failure.getErrorMessage() or type(failure.value).__name__


def _check_bytes(name: str, value: object) -> None:
    # A str key is a programming error, not an etcd condition: say so at once.
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _cancelled(failure: Failure) -> bool:
    """Whether a failure comes from a cancellation (the agent wraps it in others)."""
    if isinstance(failure.value, (CancelledError, internet_error.ConnectingCancelledError)):
        return True
    return any(_cancelled(reason) for reason in getattr(failure.value, "reasons", None) or ())


def _value(kv_value: bytes | None) -> bytes:
    # The gateway leaves out empty fields: an empty value arrives as no value.
    return kv_value if kv_value is not None else b""


class _GatewayClient(txaioetcd.Client):  # type: ignore[misc]
    """
    txaioetcd's client with its HTTP posts routed through ``TxEtcd``: the right gateway
    prefix, the injected reactor, error documents turned into ``EtcdError``.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        url: str,
        pool: HTTPConnectionPool,
        timeout: float,
        post: Callable[[str, Any], Deferred[Document]],
    ) -> None:
        txaioetcd.Client.__init__(self, reactor, url=url, pool=pool, timeout=timeout)
        self._gateway_post = post

    def _post(self, url: str | bytes, data: Any, timeout: float) -> Deferred[Document]:
        text = url.decode("utf-8") if isinstance(url, bytes) else url
        base, found, path = text.partition(TXAIOETCD_PREFIX + "/")
        if not found:
            return fail(EtcdError(f"txaioetcd built an unexpected URL {text}"))
        return self._gateway_post("/" + path, data)


@attrs.frozen
class _Reply:
    code: int
    body: bytes


@implementer(IEtcd)
class TxEtcd:
    """
    A real etcd at ``url`` (``http://host:port``). Every request is bounded by ``timeout``
    seconds, measured on ``reactor``.
    """

    log = Logger()

    def __init__(self, reactor: Any, url: str, timeout: float = 5.0) -> None:
        self._reactor = reactor
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)  # type: ignore[no-untyped-call]
        self._http = HTTPClient(agent, data_to_body_producer=_BytesProducer)
        self._client = _GatewayClient(reactor, self._url, self._pool, timeout, self._call)
        self._prefix: str | None = None
        self._prefix_waiters: list[Deferred[str]] = []
        self._watches: set[_GatewayWatch] = set()

    def __repr__(self) -> str:
        return f"<TxEtcd {self._url} prefix={self._prefix}>"

    @property
    def url(self) -> str:
        return self._url

    @property
    def gateway_prefix(self) -> str | None:
        """The gateway prefix in use ("/v3" ...), or None before the first answer."""
        return self._prefix

    # -- HTTP plumbing ---------------------------------------------------------------

    def _raw_post(self, path: str, body: Any) -> Deferred[_Reply]:
        """
        POST JSON ``body`` to ``path`` (prefix included); fire with a ``_Reply``.

        No answer within the timeout, or no connection, is ``EtcdUnavailable``; a caller's
        ``cancel()`` stays a ``CancelledError``.
        """
        url = self._url + path
        d: Deferred[Any] = self._http.post(url, json=body, reactor=self._reactor)
        d.addCallback(lambda response: response.content().addCallback(lambda content: _Reply(response.code, content)))
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, time_out)

        def settle(result: object) -> object:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if timed_out:
                return _failure(EtcdUnavailable(f"{url}: no answer within {self._timeout}s"))
            if _cancelled(result):
                return _failure(CancelledError(f"{url} cancelled"))
            if isinstance(result.value, _TRANSPORT_FAILURES):
                return _failure(EtcdUnavailable(f"{url}: {_describe(result)}"))
            return result

        d.addBoth(settle)
        return d

    def _gateway(self) -> Deferred[str]:
        """Fire with the gateway prefix, probing the server the first time."""
        if self._prefix is not None:
            return succeed(self._prefix)
        waiter: Deferred[str] = Deferred()
        self._prefix_waiters.append(waiter)
        if len(self._prefix_waiters) == 1:
            self._probe().addBoth(self._probed)
        return waiter

    def _probed(self, result: str | Failure) -> None:
        waiters, self._prefix_waiters = self._prefix_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def _probe(self) -> Generator[Deferred[Any], Any, str]:
        for prefix in GATEWAY_PREFIXES:
            reply: _Reply = yield self._raw_post(prefix + STATUS_PATH, {})
            if reply.code != 404:
                self._prefix = prefix
                self.log.info("etcd at {url} serves its JSON gateway at {prefix}", url=self._url, prefix=prefix)
                return prefix
        raise EtcdError("{} serves none of the gateway prefixes {}".format(self._url, ", ".join(GATEWAY_PREFIXES)))

    def _call(self, path: str, body: Any) -> Deferred[Document]:
        """POST ``body`` to gateway ``path`` ("/kv/put"); fire with the answer's document."""

        def post(prefix: str) -> Deferred[_Reply]:
            return self._raw_post(prefix + path, body)

        def decode(reply: _Reply) -> Document:
            try:
                document = json.loads(reply.body.decode("utf-8"))
            except ValueError:
                if reply.code == 404:
                    # The server moved under us (another version?): probe again next time.
                    self._prefix = None
                raise EtcdError(f"{path}: HTTP {reply.code} with a non-JSON answer {reply.body[:200]!r}") from None
            if not isinstance(document, dict):
                raise EtcdError(f"{path}: unexpected answer {document!r}")
            if "error" in document:
                raise _gateway_error(document, path)
            if reply.code >= 400:
                raise EtcdError(f"{path}: HTTP {reply.code} {document!r}")
            return document

        d: Deferred[Any] = self._gateway()
        d.addCallback(post)
        d.addCallback(decode)
        return d

    def _guard(self, d: Deferred[Any], where: str) -> Deferred[Any]:
        return d.addErrback(_as_etcd_error, where)

    def _wrap(
        self, where: str, convert: Callable[[Any], Any], function: Callable[..., Any], *args: Any
    ) -> Deferred[Any]:
        """
        Run a txaioetcd call and ``convert`` its result; any failure, synchronous ones
        included, comes out as an ``EtcdError``.
        """
        try:
            d: Deferred[Any] = function(*args)
        except Exception:
            d = fail()
        return self._guard(d.addCallback(convert), where)

    def _lease(self, lease_id: int) -> Any:
        return txaioetcd.Lease(self._client, None, 0, lease_id)

    # -- IEtcd -----------------------------------------------------------------------

    def get(self, key: bytes) -> Deferred[bytes | None]:
        _check_bytes("key", key)

        def first(result: Any) -> bytes | None:
            return _value(result.kvs[0].value) if result.kvs else None

        return self._wrap("get", first, self._client.get, key)

    def get_prefix(self, prefix: bytes) -> Deferred[dict[bytes, bytes]]:
        _check_bytes("prefix", prefix)
        if prefix:
            keys = txaioetcd.KeySet(prefix, prefix=True)
        else:
            keys = txaioetcd.KeySet(b"\0", range_end=b"\0")  # every key

        def as_dict(result: Any) -> dict[bytes, bytes]:
            return {kv.key: _value(kv.value) for kv in result.kvs}

        return self._wrap("get_prefix", as_dict, self._client.get, keys)

    def put(self, key: bytes, value: bytes, lease_id: int | None = None) -> Deferred[None]:
        _check_bytes("key", key)
        _check_bytes("value", value)
        lease = self._lease(lease_id) if lease_id else None
        return self._wrap("put", lambda _revision: None, self._client.set, key, value, lease)

    def put_if_absent(self, key: bytes, value: bytes) -> Deferred[bytes]:
        _check_bytes("key", key)
        _check_bytes("value", value)

        def transaction() -> Any:
            return txaioetcd.Transaction(
                compare=[txaioetcd.CompCreated(key, "==", 0)],
                success=[txaioetcd.OpSet(key, value)],
                failure=[txaioetcd.OpGet(key)],
            )

        def created(_success: object) -> bytes:
            return value

        def existing(failure: Failure) -> bytes | Failure:
            if not isinstance(failure.value, txaioetcd.Failed):
                return failure
            responses = failure.value.responses
            if not responses or not getattr(responses[0], "kvs", None):
                raise EtcdError("put_if_absent: the key vanished during the transaction")
            return _value(responses[0].kvs[0].value)

        try:
            d: Deferred[Any] = self._client.submit(transaction())
        except Exception:
            d = fail()
        d.addCallbacks(created, existing)
        return self._guard(d, "put_if_absent")

    def delete(self, key: bytes) -> Deferred[int]:
        _check_bytes("key", key)
        return self._wrap("delete", lambda deleted: deleted.deleted, self._client.delete, key)

    def grant_lease(self, ttl: int) -> Deferred[int]:
        return self._wrap("grant_lease", lambda lease: lease.lease_id, self._client.lease, int(ttl))

    def keep_alive(self, lease_id: int) -> Deferred[int]:
        def ttl(document: Document) -> int:
            result = document.get("result")
            if not isinstance(result, dict):
                raise EtcdError(f"keep_alive: unexpected answer {document!r}")
            remaining = int(result.get("TTL", 0))
            if remaining <= 0:
                raise LeaseNotFound(f"lease {lease_id:x} not found")
            return remaining

        return self._guard(self._call(KEEPALIVE_PATH, {"ID": lease_id}).addCallback(ttl), "keep_alive")

    def revoke_lease(self, lease_id: int) -> Deferred[None]:
        def gone_already(failure: Failure) -> Failure | None:
            if not isinstance(failure.value, LeaseNotFound):
                return failure
            return None

        d: Deferred[Any] = self._call(REVOKE_PATH, {"ID": lease_id})
        d.addCallback(lambda _: None)
        d.addErrback(gone_already)
        return self._guard(d, "revoke_lease")

    def watch_prefix(self, prefix: bytes, on_change: WatchCallback, start_revision: int | None = None) -> _GatewayWatch:
        _check_bytes("prefix", prefix)
        watch = _GatewayWatch(self, prefix, on_change, start_revision)
        self._watches.add(watch)
        watch.done.addBoth(self._forget_watch, watch)
        watch._start()
        return watch

    def _forget_watch(self, result: object, watch: _GatewayWatch) -> object:
        self._watches.discard(watch)
        return result

    def close(self) -> Deferred[None]:
        """Cancel open watches and close pooled connections; fires when closed."""
        for watch in list(self._watches):
            watch.cancel()
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed


class _WatchStream(Protocol):
    """Receives a watch response body and hands its bytes to the watch."""

    def __init__(self, watch: _GatewayWatch) -> None:
        self._watch = watch

    def connectionMade(self) -> None:
        if self._watch._finished and self.transport is not None:
            # Cancelled while the answer was on its way: drop the connection.
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._watch._received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._watch._stream_ended(reason)


@implementer(IWatch)
class _GatewayWatch:
    """
    One watch stream: a POST to ``/watch`` whose answer is newline-separated JSON
    documents, parsed across chunk boundaries.
    """

    log = Logger()

    def __init__(self, etcd: TxEtcd, prefix: bytes, on_change: WatchCallback, start_revision: int | None) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._on_change = on_change
        self._start_revision = start_revision
        self.started: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        self._pieces: list[bytes] = []
        self._pieces_size = 0
        self._request: Deferred[Any] | None = None
        self._stream: _WatchStream | None = None
        self._finished = False

    def __repr__(self) -> str:
        return f"<watch {self._prefix!r} on {self._etcd.url}>"

    def _create_request(self) -> dict[str, Any]:
        keys = txaioetcd.KeySet(self._prefix, prefix=True) if self._prefix else txaioetcd.KeySet(b"\0", range_end=b"\0")
        body: dict[str, Any] = keys._marshal()
        if self._start_revision is not None:
            body["start_revision"] = int(self._start_revision)
        return {"create_request": body}

    def _start(self) -> None:
        d: Deferred[Any] = self._etcd._gateway()

        def post(prefix: str) -> Deferred[IResponse]:
            url = self._etcd.url + prefix + WATCH_PATH
            posted: Deferred[Any] = self._etcd._http.post(
                url,
                json=self._create_request(),
                unbuffered=True,
                reactor=self._etcd._reactor,
                timeout=self._etcd._timeout,
            )
            return posted

        def answered(response: Any) -> Deferred[None] | None:
            self._request = None
            if response.code != 200 and not self._finished:
                refused: Deferred[None] = response.content().addCallback(self._refused, response.code)
                return refused
            self._stream = _WatchStream(self)
            response.deliverBody(self._stream)
            return None

        d.addCallback(post)
        d.addCallback(answered)
        d.addErrback(self._could_not_start)
        self._request = d

    def _refused(self, body: bytes, code: int) -> None:
        try:
            document = json.loads(body.decode("utf-8"))
        except ValueError:
            document = None
        if isinstance(document, dict) and "error" in document:
            raise _gateway_error(document, "watch")
        raise EtcdError(f"watch: HTTP {code} {body[:200]!r}")

    def _could_not_start(self, failure: Failure) -> None:
        if self._finished:
            return None
        if isinstance(failure.value, (CancelledError, DeferredTimeoutError, *_TRANSPORT_FAILURES)):
            failure = _failure(EtcdUnavailable(f"watch on {self._etcd.url}: {_describe(failure)}"))
        elif not isinstance(failure.value, EtcdError):
            failure = _failure(EtcdError(f"watch: unexpected {failure.getErrorMessage()}"))
        self._finish(failure)
        return None

    # -- stream ----------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        # Documents end with a newline; the chunks of one may arrive in any number of
        # reads, so keep the pieces and join them once, when the newline comes.
        while data and not self._finished:
            head, newline, data = data.partition(b"\n")
            self._pieces.append(head)
            self._pieces_size += len(head)
            if not newline:
                if self._pieces_size > MAX_WATCH_LINE:
                    self._abort(EtcdError(f"watch: a document longer than {MAX_WATCH_LINE} bytes"))
                return
            line = b"".join(self._pieces)
            self._pieces, self._pieces_size = [], 0
            if line.strip():
                self._document(line)

    def _document(self, line: bytes) -> None:
        try:
            document = json.loads(line.decode("utf-8"))
        except ValueError:
            self._abort(EtcdError(f"watch: unparsable document {line[:200]!r}"))
            return
        if not isinstance(document, dict):
            self._abort(EtcdError(f"watch: unexpected document {document!r}"))
            return
        if "error" in document:
            self._abort(_gateway_error(document, "watch"))
            return
        result = document.get("result")
        if not isinstance(result, dict):
            self._abort(EtcdError(f"watch: document without result {line[:200]!r}"))
            return
        if result.get("created") and not self.started.called:
            self.started.callback(None)
        for event in result.get("events", ()):
            self._event(event)
            if self._finished:
                return
        if result.get("canceled"):
            reason = result.get("cancel_reason") or "no reason given"
            compacted = result.get("compact_revision")
            if compacted:
                reason += f" (compacted at revision {compacted})"
            self._abort(EtcdError(f"watch cancelled by etcd: {reason}"))

    def _event(self, event: dict[str, Any]) -> None:
        kv = txaioetcd.KeyValue._parse(event.get("kv", {}))
        # The gateway leaves out the default enum value: no "type" means PUT.
        value = None if event.get("type") == "DELETE" else _value(kv.value)
        try:
            self._on_change(kv.key, value)
        except Exception:
            self.log.failure("watch callback failed on {key!r}", key=kv.key)

    def _stream_ended(self, reason: Failure | None) -> None:
        self._stream = None
        if self._finished:
            return
        problem: EtcdError
        if reason is not None and isinstance(reason.value, ResponseDone):
            problem = EtcdError(f"watch stream on {self._etcd.url} ended by etcd")
        else:
            problem = EtcdUnavailable(
                "watch stream on {} lost: {}".format(self._etcd.url, _describe(reason) if reason is not None else "?")
            )
        self._finish(_failure(problem))

    def _abort(self, problem: EtcdError) -> None:
        self._finish(_failure(problem))
        self._disconnect()

    def _finish(self, result: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        if not self.started.called:
            if isinstance(result, Failure):
                self.started.errback(result)
            else:
                self.started.errback(_failure(EtcdError("watch cancelled before it started")))
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def _disconnect(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
        stream = self._stream
        if stream is not None and stream.transport is not None:
            stream.transport.stopProducing()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        if self._finished:
            return
        self._finish(None)
        self._disconnect()
