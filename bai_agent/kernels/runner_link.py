"""
The agent's end of the connection to a kernel's runner (``bai_agent/runner/main.py``
has the wire protocol): a Twisted protocol over the UNIX socket in the kernel's state
directory.

``RunnerLink`` does the framing, the hello handshake, the keepalive, and answers that
belong to a request of its own (completions, interrupt results); every other message
(``output``, ``waiting-input``, ``build-finished``, ``finished``, ``error``) goes to the
``handler`` its owner (the kernel) sets. ``connect_runner`` retries until the container
has started its runner.

Timers run on an injected ``IReactorTime``; nothing here imports a reactor.
"""

from typing import Any, Callable, Optional, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.runner.framing import MAX_FRAME, FrameDecoder, FrameError, decode_message, encode

log = Logger()

PROTOCOL_VERSION = 1


class RunnerError(Exception):
    """Base of the runner link's errors."""


class RunnerUnavailable(RunnerError):
    """The runner cannot be reached, or the link to it is closed."""


class RunnerProtocolError(RunnerError):
    """The runner does not speak our protocol (version mismatch, no hello)."""


class RunnerLink(Protocol):
    """
    :param clock: ``IReactorTime`` for the keepalive and request timeouts.
    :param keepalive_interval: seconds between pings once the handshake is done.
    :param keepalive_timeout: the link is declared dead after this long without any
        frame from the runner (a pong, or anything else: output also proves life).
        Not while the owner has paused reading (see ``pauseProducing``).
    :param max_frame: the largest frame accepted; a larger one drops the link.

    ``ready`` fires with the runner's hello (a dict), or fails with
    ``RunnerProtocolError`` / ``RunnerUnavailable``. ``dead`` fires once, with a reason
    (str), when the link ends for any reason; the transport is closed by then.
    ``handler`` receives every message not consumed here; messages that arrive before
    it is set are kept and handed over when it is.
    """

    def __init__(
        self,
        clock: IReactorTime,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 15.0,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self._clock = clock
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._decoder = FrameDecoder(max_frame, messages=False)
        self.ready: Deferred[dict] = Deferred()
        self.dead: Deferred[Any] = Deferred()  # fires with the reason
        self.hello: Optional[dict] = None
        self._handler: Optional[Callable[[dict], object]] = None
        self._early: list[dict] = []
        self._closed = False
        self._dead_reason: Optional[str] = None
        self._paused = False
        self._last_heard = 0.0  # set at connectionMade, before any keepalive
        self._keepalive_call: Optional[IDelayedCall] = None
        self._next_id = 0
        self._completions: dict[int, tuple[Deferred[list], IDelayedCall]] = {}
        self._interrupts: dict[int, tuple[Deferred[bool], IDelayedCall]] = {}

    # -- the owner's API ---------------------------------------------------------

    @property
    def handler(self) -> Optional[Callable[[dict], object]]:
        return self._handler

    @handler.setter
    def handler(self, handler: Optional[Callable[[dict], object]]) -> None:
        self._handler = handler
        early, self._early = self._early, []
        for message in early:
            if self._handler is None:
                self._early.append(message)
            else:
                self._deliver(message)

    @property
    def alive(self) -> bool:
        return self.hello is not None and not self._closed

    def send(self, message: dict) -> None:
        """Send one message (a dict); ``RunnerUnavailable`` if the link is closed."""
        if self._closed or self.transport is None:
            raise RunnerUnavailable("the link to the runner is closed")
        self.transport.write(encode(message))

    def request_completions(self, text: str, options: Optional[dict] = None, timeout: float = 5.0) -> Deferred[list]:
        """
        A Deferred list of completions of ``text``. Completion is best effort: a timeout,
        a busy kernel or a lost link give an empty list, never an error.
        """
        if not self.alive:
            return succeed([])
        request_id = self._new_id()
        d: Deferred[list] = Deferred()
        call = self._clock.callLater(timeout, self._expire, self._completions, request_id, [])
        self._completions[request_id] = (d, call)
        self.send({"type": "complete", "id": request_id, "text": text, "options": options or {}})
        return d

    def interrupt(self, timeout: float = 5.0) -> Deferred[bool]:
        """A Deferred bool: whether the runner had a run to interrupt (False on timeout)."""
        if not self.alive:
            return succeed(False)
        request_id = self._new_id()
        d: Deferred[bool] = Deferred()
        call = self._clock.callLater(timeout, self._expire, self._interrupts, request_id, False)
        self._interrupts[request_id] = (d, call)
        self.send({"type": "interrupt", "id": request_id})
        return d

    def close(self, reason: str = "closed by the agent") -> None:
        """Close the link; ``dead`` fires with ``reason``."""
        self._declare_dead(reason)

    # Backpressure: the owner stops reading when its own buffer is full; the runner
    # then stops reading user output, and user code blocks on write.

    def pauseProducing(self) -> None:
        self._paused = True
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._last_heard = self._clock.seconds()  # nothing could be heard while paused
        if self.transport is not None:
            cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    # -- Protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._last_heard = self._clock.seconds()

    def dataReceived(self, data: bytes) -> None:
        self._last_heard = self._clock.seconds()
        broken: Optional[FrameError]
        try:
            payloads = self._decoder.feed(data)
        except FrameError as e:
            payloads, broken = e.messages, e
        else:
            broken = None
        for payload in payloads:
            if self._closed:
                return
            output = split_output_frame(payload)
            if output is not None:
                self._dispatch(output)
                continue
            try:
                message = decode_message(payload)
            except FrameError as e:
                broken = e
                break
            self._dispatch(message)
        if broken is not None:
            self._declare_dead(f"bad frame from the runner: {broken}")

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        why = "connection lost"
        if reason is not None and reason.value is not None:
            why = f"connection lost: {reason.getErrorMessage()}"
        self._declare_dead(why)

    # -- inside ---------------------------------------------------------------------------

    def _new_id(self):
        self._next_id += 1
        return self._next_id

    def _dispatch(self, message):
        kind = message["type"]
        if self.hello is None:
            self._handshake(message)
        elif kind == "pong":
            pass  # hearing it was the point
        elif kind == "completions":
            items = message.get("items")
            self._answer(self._completions, message.get("id"), items if isinstance(items, list) else [])
        elif kind == "interrupt-result":
            self._answer(self._interrupts, message.get("id"), bool(message.get("ok")))
        elif self._handler is None:
            self._early.append(message)
        else:
            self._deliver(message)

    def _deliver(self, message):
        # The owner's bug must not take the link down with it (an exception escaping
        # dataReceived would drop the connection): log it and go on.
        handler = self._handler
        try:
            if handler is not None:
                handler(message)
        except Exception:
            log.failure("runner message handler failed on a {kind} message", kind=message.get("type"))

    def _handshake(self, message):
        if message["type"] != "hello":
            self._fail_handshake(
                RunnerProtocolError("the runner's first message is {!r}, not hello".format(message["type"]))
            )
        elif message.get("protocol") != PROTOCOL_VERSION:
            self._fail_handshake(
                RunnerProtocolError(
                    f"the runner speaks protocol {message.get('protocol')!r}, this agent {PROTOCOL_VERSION}"
                )
            )
        else:
            self.hello = message
            self.send({"type": "hello", "protocol": PROTOCOL_VERSION})
            self._keepalive_call = self._clock.callLater(self.keepalive_interval, self._keepalive)
            self.ready.callback(message)

    def _fail_handshake(self, error):
        self._declare_dead(str(error), error)

    def _keepalive(self):
        self._keepalive_call = None
        if self._closed:
            return
        silent = self._clock.seconds() - self._last_heard
        if not self._paused and silent >= self.keepalive_timeout:
            log.warn("runner silent for {silent:.1f}s: link declared dead", silent=silent)
            self._declare_dead(f"keepalive timeout: nothing from the runner for {silent:.1f}s")
            return
        self.send({"type": "ping", "id": self._new_id()})
        self._keepalive_call = self._clock.callLater(self.keepalive_interval, self._keepalive)

    def _answer(self, pending, request_id, value):
        entry = pending.pop(request_id, None)
        if entry is not None:
            d, call = entry
            if call.active():
                call.cancel()
            d.callback(value)

    def _expire(self, pending, request_id, value):
        entry = pending.pop(request_id, None)
        if entry is not None:
            entry[0].callback(value)

    def _declare_dead(self, reason, handshake_error=None):
        if self._closed:
            return
        self._closed = True
        self._dead_reason = reason
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        for pending, value in ((self._completions, []), (self._interrupts, False)):
            for request_id in list(pending):
                self._answer(pending, request_id, value)
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()
        if not self.ready.called:
            self.ready.errback(Failure(handshake_error or RunnerUnavailable(reason)))
        self.dead.callback(reason)


class _QuietFactory(Factory):
    """Builds the one link of an attempt; quiet, since attempts come every few ms."""

    noisy = False

    def __init__(self, link):
        self.link = link

    def buildProtocol(self, addr):
        return self.link


class _Connector:
    """The retry loop of ``connect_runner``."""

    def __init__(self, reactor, socket_path, clock, timeout, link_options):
        self._reactor = reactor
        self._socket_path = socket_path
        self._clock = clock
        self._deadline = clock.seconds() + timeout
        self._timeout = timeout
        self._link_options = link_options
        # A runner takes tens of milliseconds to listen, and a failed connect to a UNIX
        # socket costs microseconds: poll often, so that the kernel is running soon after
        # its runner is (this delay is most of what CreateKernel adds to Docker's time).
        self._delay = 0.005
        self._last_error = "no attempt"
        self._retry_call = None
        self._handshake_call = None
        self._attempt_d = None
        self._handshaking = None  # the link of an attempt that connected, awaiting its hello
        self._cancelled = False
        self.result: Deferred[RunnerLink] = Deferred(self._cancel)

    def start(self):
        self._attempt()
        return self.result

    def _attempt(self):
        self._retry_call = None
        link = RunnerLink(self._clock, **self._link_options)
        remaining = max(0.1, self._deadline - self._clock.seconds())
        endpoint = UNIXClientEndpoint(self._reactor, self._socket_path, timeout=max(1, int(remaining + 0.999)))
        self._attempt_d = endpoint.connect(_QuietFactory(link))
        self._attempt_d.addCallbacks(self._connected, self._failed)

    def _connected(self, link):
        self._attempt_d = None
        self._handshaking = link
        remaining = max(0.0, self._deadline - self._clock.seconds())
        # The socket may accept before the runner gets to the hello: bound the wait.
        self._handshake_call = self._clock.callLater(remaining, link.close, "no hello from the runner in time")
        link.ready.addCallbacks(self._ready, self._failed, callbackArgs=(link,))

    def _ready(self, hello, link):
        self._cancel_handshake_timer()
        if not self.result.called:
            self.result.callback(link)
        return hello

    def _failed(self, failure):
        self._attempt_d = None
        self._handshaking = None
        self._cancel_handshake_timer()
        if self.result.called or self._cancelled:
            return None
        if failure.check(RunnerProtocolError):
            self.result.errback(failure)
            return None
        self._last_error = failure.getErrorMessage()
        if self._clock.seconds() + self._delay >= self._deadline:
            self.result.errback(
                RunnerUnavailable(
                    f"no runner at {self._socket_path} within {self._timeout}s (last error: {self._last_error})"
                )
            )
            return None
        self._retry_call = self._clock.callLater(self._delay, self._attempt)
        self._delay = min(self._delay * 1.5, 0.05)
        return None

    def _cancel_handshake_timer(self):
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def _cancel(self, result):
        self._cancelled = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._cancel_handshake_timer()
        if self._attempt_d is not None:
            self._attempt_d.cancel()
        elif self._handshaking is not None:
            # Only a link that connected has a hello to wait for (and a handler of its
            # failure); a failed attempt's link has neither and is left alone.
            self._handshaking.close("connect_runner cancelled")


def connect_runner(
    reactor: Any, socket_path: str, clock: IReactorTime, timeout: float = 30.0, **link_options: Any
) -> Deferred[RunnerLink]:
    """
    Connect to the runner listening at ``socket_path`` (a host path), retrying with a
    short backoff (50 ms doubling to 500 ms) while the container starts it, for at most
    ``timeout`` seconds. A Deferred ``RunnerLink`` whose handshake is done, or a failure:
    ``RunnerUnavailable`` after the timeout, ``RunnerProtocolError`` at once on a version
    mismatch. ``link_options`` go to ``RunnerLink``.

    :param reactor: ``IReactorUNIX`` (and ``IReactorTime``, for the endpoint's timeout).
    :param clock: ``IReactorTime`` for the retries and the link's timers.
    """
    return _Connector(reactor, socket_path, clock, timeout, link_options).start()


__all__ = [
    "PROTOCOL_VERSION",
    "RunnerError",
    "RunnerLink",
    "RunnerProtocolError",
    "RunnerUnavailable",
    "connect_runner",
]


_OUTPUT_HEAD = b'{"type":"output","run_id":"'
_STREAMS = {b'","stream":"stdout","data":"': "stdout", b'","stream":"stderr","data":"': "stderr"}
_STREAM_PART = len(b'","stream":"stdout","data":"')


def split_output_frame(payload: bytes) -> Optional[dict]:
    """
    An ``output`` frame as ``{"type": "output-raw", "run_id", "stream", "raw"}`` where
    ``raw`` is the data still JSON-escaped (UTF-8 bytes, without the quotes); None for
    any other frame.

    Output is nearly all of what a runner sends, and the agent only passes it on inside
    the ``console`` JSON of an ``Execute`` answer: escaped it came, escaped it goes, so
    the agent never decodes and re-encodes it. This relies on the runner writing output
    frames compactly with their keys in this order (``runner/connection.py``); any
    other frame, or an output frame written otherwise, takes the ordinary path.
    """
    if not payload.startswith(_OUTPUT_HEAD) or not payload.endswith(b'"}'):
        return None
    start = len(_OUTPUT_HEAD)
    end = payload.find(b'"', start)
    if end < 0:
        return None
    run_id = payload[start:end]
    stream = _STREAMS.get(payload[end : end + _STREAM_PART])
    if stream is None or b"\\" in run_id:
        return None
    raw = payload[end + _STREAM_PART : -2]
    if raw.endswith(b"\\") and (len(raw) - len(raw.rstrip(b"\\"))) % 2:
        return None  # the closing quote was escaped: not the shape we expect
    return {"type": "output-raw", "run_id": run_id.decode("ascii", "replace"), "stream": stream, "raw": raw}
