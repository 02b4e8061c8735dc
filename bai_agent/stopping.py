"""
The first phase of a graceful stop (SIGTERM), before the services stop in reverse order.

1. Stop accepting: the AMP port stops listening, new connections are closed, and new
   commands on open connections answer ``BACKEND_UNAVAILABLE`` (``Hello``,
   ``Authenticate``, ``Ping`` and ``Subscribe`` still answer). ``/healthz`` turns 503 and
   the etcd record says ``stopping``.
2. Let the commands in flight finish, for at most ``--stop-grace-period`` seconds.
3. With ``--destroy-kernels-on-stop``, destroy every kernel (reason ``agent-stopping``);
   otherwise kernels keep running and the next start takes them over.
4. Journal ``agent-stopping`` and give subscribed managers a moment to acknowledge it.
5. Close the manager connections.

Then ``etcd`` revokes the lease as it stops, so the record disappears at once.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

if TYPE_CHECKING:
    from bai_agent.kernels.registry import KernelRegistry
    from bai_agent.rpc.server import AmpContext

# How long step 4 waits at most for managers to acknowledge the last events.
EVENT_DELIVERY_TIMEOUT = 3.0
DELIVERY_POLL = 0.02
# Destroying kernels on stop is not cut short by the grace period (a half-destroyed
# kernel is what the option means to avoid), but it is bounded.
DESTROY_TIMEOUT = 60.0


class StopFlag:
    """Raised once, when a graceful stop begins; the AMP server, the record and the health read it."""

    def __init__(self) -> None:
        self.requested = False


class GracefulStop:
    """
    :param sessions: the AMP server factory (``connections``, ``commands_in_flight``).
    :param kernels: the ``KernelRegistry`` (``running``, ``destroy_all``, ``announce_stopping``).
    :param refresh_record: rewrites the etcd record now (it then says ``stopping``).
    :param note: tells the status page.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        stopping: StopFlag,
        sessions: AmpContext,
        kernels: KernelRegistry,
        refresh_record: Callable[[], object],
        note: Callable[[str], None],
        grace_period: float,
        destroy_kernels: bool,
    ) -> None:
        self.clock = clock
        self.stopping = stopping
        self.sessions = sessions
        self.kernels = kernels
        self.refresh_record = refresh_record
        self.note = note
        self.grace_period = grace_period
        self.destroy_kernels = destroy_kernels
        self.amp_port: IListeningPort | None = None  # the listening port, once there is one

    @inlineCallbacks
    def run(self) -> Generator[Deferred[Any], Any, None]:
        if self.stopping.requested:
            return
        self.stopping.requested = True
        in_flight = self.sessions.commands_in_flight
        deadline = self.clock.seconds() + self.grace_period
        self.log.info(
            "stopping: no new commands; {count} in flight get {grace:g} s to finish",
            count=len(in_flight),
            grace=self.grace_period,
        )
        self.note("stopping")
        if self.amp_port is not None:
            yield maybeDeferred(self.amp_port.stopListening)
        self.refresh_record()  # the record says "stopping" while we finish
        if in_flight:
            finished = yield within(self.clock, in_flight.settled(), deadline - self.clock.seconds())
            if not finished:
                self.log.warn(
                    "{count} commands still in flight after the grace period; their connections close",
                    count=len(in_flight),
                )
        kernels = self.kernels
        if kernels.running:
            if self.destroy_kernels:
                self.log.info("destroying {count} kernels (--destroy-kernels-on-stop)", count=kernels.count())
                done = yield within(self.clock, kernels.destroy_all("agent-stopping"), DESTROY_TIMEOUT)
                if not done:
                    self.log.error("kernels not all destroyed within {timeout} s", timeout=DESTROY_TIMEOUT)
            kernels.announce_stopping()
            delivered = yield self._await_delivery(EVENT_DELIVERY_TIMEOUT)
            if not delivered:
                self.log.warn(
                    "not every subscribed manager acknowledged the last events; they get them on their next Subscribe"
                )
        for connection in list(self.sessions.connections):
            if connection.transport is not None:
                connection.transport.loseConnection()

    @inlineCallbacks
    def _await_delivery(self, seconds: float) -> Generator[Deferred[Any], Any, bool]:
        """``True`` once every subscribed manager acknowledged every event; ``False`` after ``seconds``."""
        deadline = self.clock.seconds() + seconds
        while True:
            feeds = [connection.feed for connection in self.sessions.connections if connection.feed is not None]
            if all(feed.caught_up for feed in feeds):
                return True
            if self.clock.seconds() >= deadline:
                return False
            yield deferLater(self.clock, DELIVERY_POLL, lambda: None)


def within(clock: IReactorTime, d: Deferred[Any], seconds: float) -> Deferred[bool]:
    """
    A Deferred firing ``True`` when ``d`` fires, or ``False`` after ``seconds``, whichever
    comes first. ``d`` itself is never cancelled: the work goes on, the stop just stops
    waiting for it. ``d``'s failure is consumed (logged by whoever owns it).
    """

    def stop_timer(_: Deferred[bool]) -> None:
        if timer.active():
            timer.cancel()

    result: Deferred[bool] = Deferred(stop_timer)

    def expire() -> None:
        if not result.called:
            result.callback(False)

    timer = clock.callLater(max(0.0, seconds), expire)

    def finished(_: object) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(True)

    d.addBoth(finished)
    return result
