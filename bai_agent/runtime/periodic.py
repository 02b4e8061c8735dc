"""
``PeriodicService``: work done every few seconds, which no exception ends.

A ``LoopingCall`` stops for good when its function raises or its Deferred fails, and a
``TimerService`` logs and stops likewise; a daemon that ran for weeks would then quietly
stop re-listing containers or sampling statistics. Here a failed round is logged and the
next one comes on time. Rounds never overlap: a round that returns a Deferred holds the
next one back until it fires.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.runtime.inflight import when_fired

log = Logger()


class PeriodicService(Service):
    """
    Calls ``work()`` every ``interval`` seconds on ``clock`` while the service runs (the
    first call at start when ``now``). ``stopService`` cancels the timer and fires once the
    round in flight (if any) has ended.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        work: Callable[[], Any],
        *,
        what: str,
        now: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.clock = clock
        self.interval = interval
        self.work = work
        self.what = what
        self.now = now
        self.rounds = 0
        self.failures = 0
        self._loop: LoopingCall | None = None
        self._round: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._one_round)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=self.now).addErrback(
            lambda failure: log.failure("periodic {what} stopped", failure, what=self.what)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._round is None:
            return succeed(None)
        return when_fired(self._round)

    def run_now(self) -> Deferred[None]:
        """A round out of turn (after the one in flight, if any); fires when it has ended."""
        if self._round is not None:
            return when_fired(self._round).addCallback(lambda _: self._one_round())
        return self._one_round()

    def _one_round(self) -> Deferred[None]:
        self.rounds += 1
        d = maybeDeferred(self.work)
        d.addErrback(self._failed)
        self._round = d

        def ended(result: object) -> None:
            if self._round is d:
                self._round = None

        d.addCallback(ended)
        return d

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        log.failure(
            "periodic {what} failed; the next round comes in {interval}s",
            failure,
            what=self.what,
            interval=self.interval,
        )
