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

import json

import attr
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
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from bai_agent.etcd.interface import (
    EtcdError,
    EtcdUnavailable,
    IEtcd,
    IWatch,
    LeaseNotFound,
)

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

    def __init__(self, body):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _gateway_error(document, where):
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


def _as_etcd_error(failure, where):
    """Let EtcdError and caller cancellation through; wrap anything else."""
    if failure.check(EtcdError, CancelledError):
        return failure
    return Failure(EtcdError(f"{where}: unexpected {failure.type.__name__}: {failure.getErrorMessage()}"))


def _describe(failure):
    """A short reason for a transport failure (ResponseFailed carries a list of them)."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe(reason) for reason in reasons)
    return failure.getErrorMessage() or failure.type.__name__


def _check_bytes(name, value):
    # A str key is a programming error, not an etcd condition: say so at once.
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _cancelled(failure):
    """Whether a failure comes from a cancellation (the agent wraps it in others)."""
    if failure.check(CancelledError, internet_error.ConnectingCancelledError):
        return True
    return any(_cancelled(reason) for reason in getattr(failure.value, "reasons", None) or ())


def _value(kv_value):
    # The gateway leaves out empty fields: an empty value arrives as no value.
    return kv_value if kv_value is not None else b""


class _GatewayClient(txaioetcd.Client):
    """
    txaioetcd's client with its HTTP posts routed through ``TxEtcd``: the right gateway
    prefix, the injected reactor, error documents turned into ``EtcdError``.
    """

    def __init__(self, reactor, url, pool, timeout, post):
        txaioetcd.Client.__init__(self, reactor, url=url, pool=pool, timeout=timeout)
        self._gateway_post = post

    def _post(self, url, data, timeout):
        text = url.decode("utf-8") if isinstance(url, bytes) else url
        base, found, path = text.partition(TXAIOETCD_PREFIX + "/")
        if not found:
            return fail(EtcdError(f"txaioetcd built an unexpected URL {text}"))
        return self._gateway_post("/" + path, data)


@attr.s(frozen=True, slots=True)
class _Reply:
    code = attr.ib(type=int)
    body = attr.ib(type=bytes)


@implementer(IEtcd)
class TxEtcd:
    """
    A real etcd at ``url`` (``http://host:port``). Every request is bounded by ``timeout``
    seconds, measured on ``reactor``.
    """

    log = Logger()

    def __init__(self, reactor, url, timeout=5.0):
        self._reactor = reactor
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)
        self._http = HTTPClient(agent, data_to_body_producer=_BytesProducer)
        self._client = _GatewayClient(reactor, self._url, self._pool, timeout, self._call)
        self._prefix = None
        self._prefix_waiters = []
        self._watches = set()

    def __repr__(self):
        return f"<TxEtcd {self._url} prefix={self._prefix}>"

    @property
    def url(self):
        return self._url

    @property
    def gateway_prefix(self):
        """The gateway prefix in use ("/v3" ...), or None before the first answer."""
        return self._prefix

    # -- HTTP plumbing ---------------------------------------------------------------

    def _raw_post(self, path, body):
        """
        POST JSON ``body`` to ``path`` (prefix included); fire with a ``_Reply``.

        No answer within the timeout, or no connection, is ``EtcdUnavailable``; a caller's
        ``cancel()`` stays a ``CancelledError``.
        """
        url = self._url + path
        d = self._http.post(url, json=body, reactor=self._reactor)
        d.addCallback(lambda response: response.content().addCallback(lambda content: _Reply(response.code, content)))
        timed_out = []

        def time_out():
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, time_out)

        def settle(result):
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if timed_out:
                return Failure(EtcdUnavailable(f"{url}: no answer within {self._timeout}s"))
            if _cancelled(result):
                return Failure(CancelledError(f"{url} cancelled"))
            if result.check(*_TRANSPORT_FAILURES):
                return Failure(EtcdUnavailable(f"{url}: {_describe(result)}"))
            return result

        d.addBoth(settle)
        return d

    def _gateway(self):
        """Fire with the gateway prefix, probing the server the first time."""
        if self._prefix is not None:
            return succeed(self._prefix)
        waiter = Deferred()
        self._prefix_waiters.append(waiter)
        if len(self._prefix_waiters) == 1:
            self._probe().addBoth(self._probed)
        return waiter

    def _probed(self, result):
        waiters, self._prefix_waiters = self._prefix_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def _probe(self):
        for prefix in GATEWAY_PREFIXES:
            reply = yield self._raw_post(prefix + STATUS_PATH, {})
            if reply.code != 404:
                self._prefix = prefix
                self.log.info("etcd at {url} serves its JSON gateway at {prefix}", url=self._url, prefix=prefix)
                return prefix
        raise EtcdError("{} serves none of the gateway prefixes {}".format(self._url, ", ".join(GATEWAY_PREFIXES)))

    def _call(self, path, body):
        """POST ``body`` to gateway ``path`` ("/kv/put"); fire with the answer's document."""

        def post(prefix):
            return self._raw_post(prefix + path, body)

        def decode(reply):
            try:
                document = json.loads(reply.body.decode("utf-8"))
            except ValueError:
                if reply.code == 404:
                    # The server moved under us (another version?): probe again next time.
                    self._prefix = None
                raise EtcdError(f"{path}: HTTP {reply.code} with a non-JSON answer {reply.body[:200]!r}")
            if not isinstance(document, dict):
                raise EtcdError(f"{path}: unexpected answer {document!r}")
            if "error" in document:
                raise _gateway_error(document, path)
            if reply.code >= 400:
                raise EtcdError(f"{path}: HTTP {reply.code} {document!r}")
            return document

        d = self._gateway()
        d.addCallback(post)
        d.addCallback(decode)
        return d

    def _guard(self, d, where):
        return d.addErrback(_as_etcd_error, where)

    def _wrap(self, where, convert, function, *args):
        """
        Run a txaioetcd call and ``convert`` its result; any failure, synchronous ones
        included, comes out as an ``EtcdError``.
        """
        try:
            d = function(*args)
        except Exception:
            d = fail()
        return self._guard(d.addCallback(convert), where)

    def _lease(self, lease_id):
        return txaioetcd.Lease(self._client, None, 0, lease_id)

    # -- IEtcd -----------------------------------------------------------------------

    def get(self, key):
        _check_bytes("key", key)

        def first(result):
            return _value(result.kvs[0].value) if result.kvs else None

        return self._wrap("get", first, self._client.get, key)

    def get_prefix(self, prefix):
        _check_bytes("prefix", prefix)
        if prefix:
            keys = txaioetcd.KeySet(prefix, prefix=True)
        else:
            keys = txaioetcd.KeySet(b"\0", range_end=b"\0")  # every key

        def as_dict(result):
            return {kv.key: _value(kv.value) for kv in result.kvs}

        return self._wrap("get_prefix", as_dict, self._client.get, keys)

    def put(self, key, value, lease_id=None):
        _check_bytes("key", key)
        _check_bytes("value", value)
        lease = self._lease(lease_id) if lease_id else None
        return self._wrap("put", lambda _revision: None, self._client.set, key, value, lease)

    def put_if_absent(self, key, value):
        _check_bytes("key", key)
        _check_bytes("value", value)

        def transaction():
            return txaioetcd.Transaction(
                compare=[txaioetcd.CompCreated(key, "==", 0)],
                success=[txaioetcd.OpSet(key, value)],
                failure=[txaioetcd.OpGet(key)],
            )

        def created(_success):
            return value

        def existing(failure):
            failure.trap(txaioetcd.Failed)
            responses = failure.value.responses
            if not responses or not getattr(responses[0], "kvs", None):
                raise EtcdError("put_if_absent: the key vanished during the transaction")
            return _value(responses[0].kvs[0].value)

        try:
            d = self._client.submit(transaction())
        except Exception:
            d = fail()
        d.addCallbacks(created, existing)
        return self._guard(d, "put_if_absent")

    def delete(self, key):
        _check_bytes("key", key)
        return self._wrap("delete", lambda deleted: deleted.deleted, self._client.delete, key)

    def grant_lease(self, ttl):
        return self._wrap("grant_lease", lambda lease: lease.lease_id, self._client.lease, int(ttl))

    def keep_alive(self, lease_id):
        def ttl(document):
            result = document.get("result")
            if not isinstance(result, dict):
                raise EtcdError(f"keep_alive: unexpected answer {document!r}")
            remaining = int(result.get("TTL", 0))
            if remaining <= 0:
                raise LeaseNotFound(f"lease {lease_id:x} not found")
            return remaining

        return self._guard(self._call(KEEPALIVE_PATH, {"ID": lease_id}).addCallback(ttl), "keep_alive")

    def revoke_lease(self, lease_id):
        def gone_already(failure):
            failure.trap(LeaseNotFound)
            return None

        d = self._call(REVOKE_PATH, {"ID": lease_id})
        d.addCallback(lambda _: None)
        d.addErrback(gone_already)
        return self._guard(d, "revoke_lease")

    def watch_prefix(self, prefix, on_change, start_revision=None):
        _check_bytes("prefix", prefix)
        watch = _GatewayWatch(self, prefix, on_change, start_revision)
        self._watches.add(watch)
        watch.done.addBoth(self._forget_watch, watch)
        watch._start()
        return watch

    def _forget_watch(self, result, watch):
        self._watches.discard(watch)
        return result

    def close(self):
        """Cancel open watches and close pooled connections; fires when closed."""
        for watch in list(self._watches):
            watch.cancel()
        return self._pool.closeCachedConnections()


class _WatchStream(Protocol):
    """Receives a watch response body and hands its bytes to the watch."""

    def __init__(self, watch):
        self._watch = watch

    def connectionMade(self):
        if self._watch._finished:
            # Cancelled while the answer was on its way: drop the connection.
            self.transport.stopProducing()

    def dataReceived(self, data):
        self._watch._received(data)

    def connectionLost(self, reason=None):
        self._watch._stream_ended(reason)


@implementer(IWatch)
class _GatewayWatch:
    """
    One watch stream: a POST to ``/watch`` whose answer is newline-separated JSON
    documents, parsed across chunk boundaries.
    """

    log = Logger()

    def __init__(self, etcd, prefix, on_change, start_revision):
        self._etcd = etcd
        self._prefix = prefix
        self._on_change = on_change
        self._start_revision = start_revision
        self.started = Deferred()
        self.done = Deferred()
        self._pieces = []
        self._pieces_size = 0
        self._request = None
        self._stream = None
        self._finished = False

    def __repr__(self):
        return f"<watch {self._prefix!r} on {self._etcd.url}>"

    def _create_request(self):
        keys = txaioetcd.KeySet(self._prefix, prefix=True) if self._prefix else txaioetcd.KeySet(b"\0", range_end=b"\0")
        body = keys._marshal()
        if self._start_revision is not None:
            body["start_revision"] = int(self._start_revision)
        return {"create_request": body}

    def _start(self):
        d = self._etcd._gateway()

        def post(prefix):
            url = self._etcd.url + prefix + WATCH_PATH
            return self._etcd._http.post(
                url,
                json=self._create_request(),
                unbuffered=True,
                reactor=self._etcd._reactor,
                timeout=self._etcd._timeout,
            )

        def answered(response):
            self._request = None
            if response.code != 200 and not self._finished:
                return response.content().addCallback(self._refused, response.code)
            self._stream = _WatchStream(self)
            response.deliverBody(self._stream)
            return None

        d.addCallback(post)
        d.addCallback(answered)
        d.addErrback(self._could_not_start)
        self._request = d

    def _refused(self, body, code):
        try:
            document = json.loads(body.decode("utf-8"))
        except ValueError:
            document = None
        if isinstance(document, dict) and "error" in document:
            raise _gateway_error(document, "watch")
        raise EtcdError(f"watch: HTTP {code} {body[:200]!r}")

    def _could_not_start(self, failure):
        if self._finished:
            return None
        if failure.check(CancelledError, DeferredTimeoutError, *_TRANSPORT_FAILURES):
            failure = Failure(EtcdUnavailable(f"watch on {self._etcd.url}: {_describe(failure)}"))
        elif not failure.check(EtcdError):
            failure = Failure(EtcdError(f"watch: unexpected {failure.getErrorMessage()}"))
        self._finish(failure)
        return None

    # -- stream ----------------------------------------------------------------------

    def _received(self, data):
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

    def _document(self, line):
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

    def _event(self, event):
        kv = txaioetcd.KeyValue._parse(event.get("kv", {}))
        # The gateway leaves out the default enum value: no "type" means PUT.
        value = None if event.get("type") == "DELETE" else _value(kv.value)
        try:
            self._on_change(kv.key, value)
        except Exception:
            self.log.failure("watch callback failed on {key!r}", key=kv.key)

    def _stream_ended(self, reason):
        self._stream = None
        if self._finished:
            return
        if reason is not None and reason.check(ResponseDone):
            problem = EtcdError(f"watch stream on {self._etcd.url} ended by etcd")
        else:
            problem = EtcdUnavailable(
                "watch stream on {} lost: {}".format(self._etcd.url, _describe(reason) if reason is not None else "?")
            )
        self._finish(Failure(problem))

    def _abort(self, problem):
        self._finish(Failure(problem))
        self._disconnect()

    def _finish(self, result):
        if self._finished:
            return
        self._finished = True
        if not self.started.called:
            if isinstance(result, Failure):
                self.started.errback(result)
            else:
                self.started.errback(Failure(EtcdError("watch cancelled before it started")))
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def _disconnect(self):
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
        stream = self._stream
        if stream is not None and stream.transport is not None:
            stream.transport.stopProducing()

    def cancel(self):
        if self._finished:
            return
        self._finish(None)
        self._disconnect()
