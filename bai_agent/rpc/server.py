"""
The AMP server managers talk to (PROTOCOL.md sections 1 and 2).

One ``AgentAMP`` protocol per manager connection, with its own ``AgentLocator`` holding the
connection's session (nonce, authenticated or not). The locator enforces authentication,
turns unparseable arguments into ``INVALID_REQUEST`` and any undeclared failure into
``BACKEND_UNAVAILABLE`` (logged), so no exception ever reaches AMP and drops a connection
that did nothing wrong. Bytes that are not AMP, and unknown command names, close that one
connection.

What a connection may cost is bounded (``bai_agent.rpc.limits``): boxes of a few KiB until
it authenticates, within the authentication deadline, and at most
``MAX_WAITING_CONNECTIONS`` such connections at once; the protocol's own limits after.
Lines a stranger can cause (failed authentications, connections closed for bad bytes,
dropped connections) are rate-limited (``bai_agent.runtime.lograte``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from bai_agent.kernels.interface import IKernelOperations
from bai_agent.protocol import commands, errors
from bai_agent.protocol.auth import new_nonce, verify_mac
from bai_agent.rpc.events import EventFeed
from bai_agent.rpc.limits import (
    AUTHENTICATED,
    MAX_WAITING_CONNECTIONS,
    UNAUTHENTICATED,
    BoundedBoxReceiver,
    BoxLimit,
    WaitingRoom,
)
from bai_agent.runtime.inflight import InFlight
from bai_agent.runtime.lograte import LogRate

if TYPE_CHECKING:
    from bai_agent.rpc.limits import IConnectionTransport

MAX_FAILED_AUTHENTICATIONS = 3
#: Seconds a connection closed for a rotated secret may take to flush its answers.
HANG_UP_GRACE = 2.0

# During a graceful stop, new work is refused; these still answer, so that a manager can
# tell who it talks to, stay connected and collect the events up to ``agent-stopping``.
ALLOWED_WHILE_STOPPING = frozenset(
    command.commandName for command in (commands.Hello, commands.Authenticate, commands.Ping, commands.Subscribe)
)


@attrs.frozen
class AmpContext:
    """
    What the responders and connections use of the agent, each part required. Built by the
    composition root; the connections and the commands in flight are kept here so that a
    graceful stop (``bai_agent.stopping``) can wait for and close them.
    """

    clock: IReactorTime
    agent_id: str
    version: str
    #: ``IKernelOperations``: what commands do to kernels.
    kernels: IKernelOperations
    #: The event journal (``last_seq``, ``since``, listeners), for ``Subscribe``.
    journal: Any
    #: The ``DockerService``: ``healthy``, ``last_error`` and the local ``images``.
    images: Any
    #: The agent record for ``GetAgentInfo``.
    info: Callable[[], dict[str, Any]]
    #: The namespace secret, or None while the agent has none.
    secret: Callable[[], str | None]
    #: ``observe_command(name, seconds, error_code)``, for the metrics.
    observe_command: Callable[..., None]
    #: Seconds between the agent's pings (and a third of how long a silent manager stays).
    heartbeat_interval: Callable[[], float]
    #: The ``StopFlag``: once raised, new connections and commands are refused.
    stopping: Any
    #: Seconds a new connection has to authenticate.
    authentication_deadline: float
    connections: set[AgentAMP] = attrs.field(factory=set)
    commands_in_flight: InFlight = attrs.field(factory=InFlight)


class AgentSession:
    """What the agent knows about one manager connection."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.nonce = new_nonce()
        self.authenticated = False
        self.secret: str | None = None  # the secret it authenticated with: a rotation ends the session
        self.failed_authentications = 0


class AgentLocator(amp.CommandLocator):
    """Responders for one connection, over the agent's ``AmpContext``."""

    log = Logger()

    def __init__(self, context: AmpContext, session: AgentSession, protocol: AgentAMP | None = None) -> None:
        self.context = context
        self.session = session
        self.protocol = protocol

    # -- dispatch --------------------------------------------------------------------

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Deferred[Any]] | None:
        command = commands.COMMANDS_BY_NAME.get(name)
        if command is None:
            return None
        responder = super().locateResponder(name)
        if responder is None:
            return None

        def guarded(box: amp.AmpBox) -> Deferred[Any]:
            started = time.monotonic()
            result: Deferred[Any]
            if name not in commands.UNAUTHENTICATED_COMMANDS and not self.session.authenticated:
                result = fail(errors.NotAuthenticated("authenticate first (Hello, then Authenticate)"))
                result = result.addErrback(self._declared, command)
            elif self.context.stopping.requested and name not in ALLOWED_WHILE_STOPPING:
                result = fail(errors.BackendUnavailable("the agent is stopping; retry on another agent or later"))
                result = result.addErrback(self._declared, command)
            else:
                try:
                    command.parseArguments(box, self)
                except Exception as e:
                    result = fail(errors.InvalidRequest(f"bad arguments for {name.decode()}: {_describe(e)}"))
                    result.addErrback(self._declared, command)
                else:
                    result = maybeDeferred(responder, box).addErrback(self._undeclared, name)
            result.addBoth(self._observe, name, started)
            if not result.called:
                self.context.commands_in_flight.track(result)
            return result

        return guarded

    def _declared(self, failure: Failure, command: type[commands.AgentCommand]) -> Failure:
        # allErrors: what Command's metaclass collects from ``errors``; Twisted does not declare it.
        all_errors = command.allErrors  # type: ignore[attr-defined]
        code = all_errors[failure.trap(*all_errors)]
        return Failure(amp.RemoteAmpError(code, str(failure.value)))

    def _undeclared(self, failure: Failure, name: bytes) -> Failure:
        if failure.check(amp.RemoteAmpError):
            return failure
        self.log.failure(
            "command {command} from {peer} failed unexpectedly",
            failure,
            command=name.decode(),
            peer=self.session.peer,
        )
        why = failure.getErrorMessage() or type(failure.value).__name__
        return Failure(
            amp.RemoteAmpError(
                errors.BackendUnavailable.code,
                f"{name.decode()} failed inside the agent ({why}); see the agent log",
            )
        )

    def _observe(self, result: object, name: bytes, started: float) -> object:
        code = None
        if isinstance(result, Failure) and isinstance(result.value, amp.RemoteAmpError):
            code = result.value.errorCode
        self.context.observe_command(name.decode(), time.monotonic() - started, code)
        return result

    # -- session ---------------------------------------------------------------------

    @commands.Hello.responder
    def hello(self) -> dict[str, Any]:
        return {
            "agent_id": self.context.agent_id,
            "version": self.context.version,
            "protocol": commands.PROTOCOL_VERSION,
            "nonce": self.session.nonce,
        }

    @commands.Authenticate.responder
    def authenticate(self, mac: str) -> dict[str, Any]:
        secret = self.context.secret()
        if secret is None:
            raise errors.BackendUnavailable("the agent has no secret yet (etcd unreachable); retry later")
        if verify_mac(secret, self.session.nonce, mac):
            self.session.authenticated = True
            self.session.secret = secret
            if self.protocol is not None:
                self.protocol.session_authenticated()
            self.log.info("manager {peer} authenticated", peer=self.session.peer)
            return {}
        self.session.failed_authentications += 1
        self._log_rate().emit(
            "failed authentication",
            LogLevel.warn,
            "manager {peer} failed to authenticate ({count} of {limit})",
            peer=self.session.peer,
            count=self.session.failed_authentications,
            limit=MAX_FAILED_AUTHENTICATIONS,
        )
        if self.session.failed_authentications >= MAX_FAILED_AUTHENTICATIONS and self.protocol:
            # Let the error answer go out first, then hang up.
            self.context.clock.callLater(0, self.protocol.connected_transport().loseConnection)
        raise errors.AuthFailed("the MAC does not match this namespace's secret")

    def _log_rate(self) -> LogRate:
        if self.protocol is not None:
            return self.protocol.log_rate
        return LogRate(self.context.clock, self.log)

    @commands.Ping.responder
    def ping(self, payload: str) -> dict[str, Any]:
        return {"payload": payload}

    # -- agent -----------------------------------------------------------------------

    @commands.GetAgentInfo.responder
    def get_agent_info(self) -> dict[str, Any]:
        return {"info": self.context.info()}

    @commands.ListImages.responder
    def list_images(self) -> dict[str, Any]:
        if not self.context.images.healthy:
            raise errors.BackendUnavailable(f"Docker is unreachable: {self.context.images.last_error}")
        return {"images": [image.to_json() for image in self.context.images.images]}

    # -- kernels ---------------------------------------------------------------------

    @commands.ListKernels.responder
    def list_kernels(self) -> dict[str, Any]:
        return {"kernels": self.context.kernels.list_records()}

    @commands.CreateKernel.responder
    def create_kernel(
        self,
        kernel_id: str,
        image: str,
        resources: Any,
        environ: Any = None,
        mounts: Any = None,
        idle_timeout: int | None = None,
        exec_timeout: int | None = None,
        image_pull: str | None = None,
        registry_auth: Any = None,
    ) -> Deferred[dict[str, Any]]:
        d = self.context.kernels.create(
            kernel_id,
            image,
            resources,
            environ=environ,
            mounts=mounts,
            idle_timeout=idle_timeout,
            exec_timeout=exec_timeout,
            image_pull=image_pull,
            registry_auth=registry_auth,
        )
        return d.addCallback(lambda record: {"kernel": record})

    @commands.PullImage.responder
    def pull_image(self, image: str, registry_auth: Any = None) -> Deferred[dict[str, Any]]:
        return self.context.kernels.pull_image(image, registry_auth).addCallback(lambda entry: {"image": entry})

    @commands.RemoveImage.responder
    def remove_image(self, image: str) -> Deferred[dict[str, Any]]:
        return self.context.kernels.remove_image(image).addCallback(lambda _: {})

    @commands.DestroyKernel.responder
    def destroy_kernel(self, kernel_id: str, reason: str | None = None) -> Deferred[dict[str, Any]]:
        return self.context.kernels.destroy(kernel_id, reason or "user-requested")

    @commands.RestartKernel.responder
    def restart_kernel(self, kernel_id: str) -> Deferred[dict[str, Any]]:
        return self.context.kernels.restart(kernel_id).addCallback(lambda record: {"kernel": record})

    @commands.Execute.responder
    def execute(
        self, kernel_id: str, mode: str, code: str, run_id: str | None = None, options: Any = None
    ) -> Deferred[dict[str, Any]]:
        return self.context.kernels.session(kernel_id).execute(mode, code, run_id=run_id, options=options)

    @commands.InterruptKernel.responder
    def interrupt_kernel(self, kernel_id: str) -> Deferred[dict[str, Any]]:
        return self.context.kernels.session(kernel_id).interrupt()

    @commands.GetCompletions.responder
    def get_completions(self, kernel_id: str, text: str, options: Any = None) -> Deferred[dict[str, Any]]:
        d = self.context.kernels.session(kernel_id).completions(text, options)
        return d.addCallback(lambda items: {"completions": items})

    @commands.GetKernelStats.responder
    def get_kernel_stats(self, kernel_id: str) -> Deferred[dict[str, Any]]:
        return self.context.kernels.kernel_stats(kernel_id).addCallback(lambda stats: {"stats": stats})

    @commands.UploadFile.responder
    def upload_file(self, kernel_id: str, path: str, data: bytes, append: bool) -> Deferred[dict[str, Any]]:
        return self.context.kernels.upload(kernel_id, path, data, append).addCallback(lambda size: {"size": size})

    @commands.DownloadFile.responder
    def download_file(self, kernel_id: str, path: str, offset: int, length: int) -> Deferred[dict[str, Any]]:
        d = self.context.kernels.download(kernel_id, path, offset, length)
        return d.addCallback(lambda result: {"data": result[0], "size": result[1], "eof": result[2]})

    @commands.ListFiles.responder
    def list_files(self, kernel_id: str, path: str | None = None) -> Deferred[dict[str, Any]]:
        return self.context.kernels.list_files(kernel_id, path or ".").addCallback(lambda entries: {"files": entries})

    @commands.GetLogs.responder
    def get_logs(self, kernel_id: str, tail: int | None = None) -> Deferred[dict[str, Any]]:
        return self.context.kernels.logs(kernel_id, tail).addCallback(lambda text: {"logs": text})

    @commands.StartService.responder
    def start_service(self, kernel_id: str, service: str, options: Any = None) -> Deferred[dict[str, Any]]:
        return self.context.kernels.start_service(kernel_id, service, options)

    @commands.StopService.responder
    def stop_service(self, kernel_id: str, service: str) -> Deferred[dict[str, Any]]:
        return self.context.kernels.stop_service(kernel_id, service).addCallback(lambda _: {})

    @commands.ListServices.responder
    def list_services(self, kernel_id: str) -> dict[str, Any]:
        return {"services": self.context.kernels.list_services(kernel_id)}

    @commands.Reset.responder
    def reset(self) -> Deferred[dict[str, Any]]:
        return self.context.kernels.reset().addCallback(lambda count: {"destroyed": count})

    # -- events ----------------------------------------------------------------------

    @commands.Subscribe.responder
    def subscribe(self, since: int) -> dict[str, Any]:
        if since < 0:
            raise errors.InvalidRequest(f"since must be 0 or a seq, got {since}")
        last_seq = self.context.journal.last_seq
        if since > last_seq:
            # A seq this agent never gave: following it would skip every event up to it.
            raise errors.InvalidRequest(f"since {since} is after the last event seq {last_seq} of this agent")
        if self.protocol is None:
            raise errors.InvalidRequest("Subscribe needs a connection")
        return {"last_seq": self.protocol.subscribe(since)}


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing argument {error.args[0]!r}"
    return f"{type(error).__name__}: {error}"


class AgentAMP(BoundedBoxReceiver, amp.AMP):
    """
    One manager connection: pings the manager every heartbeat interval and drops it when
    nothing was heard for three intervals; closes itself, and only itself, on bytes that
    are not AMP, on a box past its limit, and when it has not authenticated by the
    deadline. ``waiting`` is the agent's ``WaitingRoom`` of unauthenticated connections,
    ``log_rate`` its ``LogRate``.
    """

    log = Logger()

    def __init__(
        self, context: AmpContext, session: AgentSession, waiting: WaitingRoom[AgentAMP], log_rate: LogRate
    ) -> None:
        self.context = context
        self.session = session
        self.waiting = waiting
        self.log_rate = log_rate
        super().__init__(locator=AgentLocator(context, session, self))
        self._ping_call: IDelayedCall | None = None
        self._silence_call: IDelayedCall | None = None
        self._deadline_call: IDelayedCall | None = None
        self._hang_up_call: IDelayedCall | None = None
        self.feed: EventFeed | None = None

    def connected_transport(self) -> IConnectionTransport:
        """
        The transport, for what runs only while connected: parsing, the responders, and
        timers and the ``WaitingRoom``, which ``connectionLost`` cancels and leaves.
        """
        assert self.transport is not None, "the connection is closed"
        return self.transport

    def makeConnection(self, transport: ITransport) -> None:
        # Not amp.AMP's, which logs every connection made and lost: two lines per connect,
        # which anyone can cause. The agent logs what matters itself, at a bounded rate.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.context.connections.add(self)
        self._heard()
        self._schedule_ping()
        deadline = self.context.authentication_deadline
        self._deadline_call = self.context.clock.callLater(deadline, self._authentication_overdue)
        for oldest in self.waiting.enter(self):
            oldest.evict()

    # -- limits ----------------------------------------------------------------------

    def box_limit(self) -> BoxLimit:
        return AUTHENTICATED if self.session.authenticated else UNAUTHENTICATED

    def box_limit_exceeded(self, reason: str) -> None:
        self.log_rate.emit(
            "oversized box",
            LogLevel.warn,
            "closing connection from {peer}: {reason}",
            peer=self.session.peer,
            reason=reason,
        )
        self.connected_transport().abortConnection()

    def session_authenticated(self) -> None:
        """The manager authenticated: it no longer waits, and may send the protocol's largest boxes."""
        self.waiting.leave(self)
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None

    def _authentication_overdue(self) -> None:
        self._deadline_call = None
        self.waiting.leave(self)
        self.log_rate.emit(
            "authentication deadline",
            LogLevel.info,
            "closing connection from {peer}: it did not authenticate within {deadline:g} s",
            peer=self.session.peer,
            deadline=self.context.authentication_deadline,
        )
        self.connected_transport().abortConnection()

    def evict(self) -> None:
        """Close this waiting connection to make room for a newer one (see ``WaitingRoom``)."""
        self.log_rate.emit(
            "waiting connection closed",
            LogLevel.warn,
            "closing unauthenticated connection from {peer}: {limit} connections are waiting to authenticate",
            peer=self.session.peer,
            limit=self.waiting.capacity,
        )
        self.connected_transport().abortConnection()

    def end_session(self, why: str) -> None:
        """
        Close an authenticated connection (its secret was rotated): commands are no longer
        taken, answers already written go out within ``HANG_UP_GRACE`` seconds.
        """
        self.session.authenticated = False
        self.log.info("closing the session of manager {peer}: {why}", peer=self.session.peer, why=why)
        transport = self.connected_transport()
        transport.loseConnection()
        if self._hang_up_call is None:
            self._hang_up_call = self.context.clock.callLater(HANG_UP_GRACE, transport.abortConnection)

    def subscribe(self, since: int) -> int:
        """Start (or restart) the event feed of this connection after ``since``."""
        if self.feed is not None:
            self.feed.stop()
        self.feed = None
        feed = EventFeed(self.context.journal, self, since)
        last_seq = feed.start()  # EventsExpired escapes to the responder
        self.feed = feed
        # The answer goes out first; the replay follows it.
        self.context.clock.callLater(0, feed.resume)
        return last_seq

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        self.context.connections.discard(self)
        self.waiting.leave(self)
        for call in (self._ping_call, self._silence_call, self._deadline_call, self._hang_up_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._silence_call = self._deadline_call = self._hang_up_call = None
        amp.BinaryBoxProtocol.connectionLost(self, reason)  # amp.AMP's only adds a log line
        self.transport = None

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._heard()
        try:
            command = box.get(amp.COMMAND)
            if command is not None and command not in commands.COMMANDS_BY_NAME:
                raise amp.UnhandledCommand(f"unknown command {command[:64]!r}")
            super().ampBoxReceived(box)
        except Exception as e:
            self.log_rate.emit(
                "bad bytes",
                LogLevel.warn,
                "closing connection from {peer}: {error}",
                peer=self.session.peer,
                error=_describe(e),
            )
            self.connected_transport().loseConnection()

    def unhandledError(self, failure: Failure) -> None:
        """
        A command sent without ``_ask`` failed: there is nobody to answer, so log it and
        keep the connection (AMP would drop it, as for a failure of its own).
        """
        if failure.check(amp.RemoteAmpError):
            self.log.info(
                "a command from {peer} that asked for no answer failed: {error}",
                peer=self.session.peer,
                error=failure.value,
            )
            return
        super().unhandledError(failure)

    def _heard(self) -> None:
        timeout = 3 * self.context.heartbeat_interval()
        if self._silence_call is not None and self._silence_call.active():
            self._silence_call.reset(timeout)
        else:
            self._silence_call = self.context.clock.callLater(timeout, self._silent)

    def _silent(self) -> None:
        self.log_rate.emit(
            "silent connection", LogLevel.info, "dropping silent manager connection {peer}", peer=self.session.peer
        )
        # Nothing heard for three intervals: the peer does not read either, so waiting for
        # the answers to flush could hold the connection for ever.
        self.connected_transport().abortConnection()

    def _schedule_ping(self) -> None:
        self._ping_call = self.context.clock.callLater(self.context.heartbeat_interval(), self._ping)

    def _ping(self) -> None:
        self._ping_call = None
        d = self.callRemote(commands.Ping, payload="heartbeat")
        d.addErrback(lambda failure: None)  # a lost connection ends here; silence handles the rest
        self._schedule_ping()


class AgentAMPFactory(Factory):
    """
    Builds one ``AgentAMP`` per manager connection; all of them share one ``WaitingRoom``
    (at most ``max_waiting`` unauthenticated connections) and one ``LogRate``.
    """

    noisy = False
    log = Logger()

    def __init__(self, context: AmpContext, max_waiting: int = MAX_WAITING_CONNECTIONS) -> None:
        self.context = context
        self.waiting: WaitingRoom[AgentAMP] = WaitingRoom(max_waiting)
        self.log_rate = LogRate(context.clock, AgentAMP.log)

    def stopFactory(self) -> None:
        self.log_rate.stop()  # say what was suppressed, now rather than never

    def buildProtocol(self, addr: IAddress | None) -> AgentAMP | None:
        if self.context.stopping.requested:
            return None  # closes the connection: the agent is going away
        peer = f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"
        protocol = AgentAMP(self.context, AgentSession(peer), self.waiting, self.log_rate)
        protocol.factory = self
        return protocol

    def secret_changed(self, secret: str) -> None:
        """
        The namespace secret changed (an etcd secret listener): close every session
        authenticated with another one. Managers connect again and authenticate anew.
        """
        stale = [
            connection
            for connection in list(self.context.connections)
            if connection.session.authenticated and connection.session.secret != secret
        ]
        if stale:
            self.log.info(
                "the namespace secret changed: closing {count} sessions authenticated with the old one",
                count=len(stale),
            )
        for connection in stale:
            connection.end_session("the namespace secret changed")
