"""
The status page's HTTP server: twisted.web's ``Site`` with a deadline for each request.

``HTTPChannel`` has only an idle timeout, which every byte resets, so a client that sends
one header line a second and never ends its headers (slowloris) holds its connection, and
an fd of the agent's, for ever. Here a connection must deliver a complete request, its
headers and its body (which no route of the page needs: at most ``MAX_BODY`` bytes),
within ``REQUEST_TIMEOUT`` seconds of its connect, or of the end of the previous response
on a kept-alive connection (so an idle kept-alive connection goes too, as with other
servers' keep-alive timeouts; browsers open a new one). Past it the connection is closed,
and aborted ``ABORT_AFTER`` seconds later if its peer does not read what is left to write.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import IResource
from twisted.web.server import Site

from bai_agent.runtime.lograte import LogRate

REQUEST_TIMEOUT = 10.0
ABORT_AFTER = 2.0
MAX_BODY = 64 << 10


class RequestDeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` that closes a connection whose request does not arrive in time."""

    _deadline_call: IDelayedCall | None = None
    _abort_call: IDelayedCall | None = None
    _refused = False
    #: Set by the site that builds the channel.
    site: StatusSite
    transport: ITCPTransport | None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._await_request()

    def allHeadersReceived(self) -> None:
        if self.length is None or self.length > self.site.max_body:
            # A chunked body, or a larger one than any route reads: answer and hang up
            # without taking it (twisted.web would spool it to a temporary file).
            self._refused = True
            assert self.transport is not None  # a connection is receiving
            self.transport.write(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self.loseConnection()
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel(self._deadline_call)
        self._deadline_call = None
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before the parent, which may go on at once with a pipelined request.
        self._await_request()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel(self._deadline_call)
        self._cancel(self._abort_call)
        self._deadline_call = self._abort_call = None
        super().connectionLost(reason)

    def _await_request(self) -> None:
        self._cancel(self._deadline_call)
        self._deadline_call = self.callLater(self.site.request_timeout, self._request_overdue)

    def _request_overdue(self) -> None:
        self._deadline_call = None
        transport = self.transport
        assert transport is not None  # connectionLost cancels this call
        peer = transport.getPeer()
        self.site.log_rate.emit(
            "slow HTTP request",
            LogLevel.info,
            "closing HTTP connection from {peer}: no complete request within {timeout:g} s",
            peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            timeout=self.site.request_timeout,
        )
        if not getattr(transport, "disconnecting", False):
            self.loseConnection()
        self._abort_call = self.callLater(ABORT_AFTER, transport.abortConnection)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class StatusSite(Site):
    """A ``Site`` whose connections are ``RequestDeadlineChannel``s; ``reactor`` is required."""

    # HTTPFactory types ``protocol`` as its HTTP/1.1-or-HTTP/2 wrapper's factory; any
    # HTTPChannel class does (buildProtocol sets the same attributes on it).
    protocol = RequestDeadlineChannel  # type: ignore[assignment]
    _log = Logger()  # not ``log``: that is the request log method of HTTPFactory

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        request_timeout: float = REQUEST_TIMEOUT,
        max_body: int = MAX_BODY,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.request_timeout = request_timeout
        self.max_body = max_body
        self.log_rate = LogRate(reactor, self._log)

    def stopFactory(self) -> None:
        super().stopFactory()
        self.log_rate.stop()
