"""
Rate-limited log lines, for what a stranger can make the agent say as often as it likes
(failed authentications, connections closed for bad bytes, dropped silent or slow
connections): a client guessing MACs must not fill the disk with the agent's log.

    log_rate = LogRate(clock, log)
    log_rate.emit("failed authentication", LogLevel.warn, "manager {peer} failed ...", peer=peer)

Each kind gets at most ``burst`` lines per ``period`` seconds, counted from its first line;
the ones past that are counted, and when the period ends one line says how many were
suppressed. Driven by the injected clock, so that tests run it on ``task.Clock``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

BURST = 10
PERIOD = 10.0


class _Window:
    __slots__ = ("ends", "emitted", "suppressed", "level", "call")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.emitted = 0
        self.suppressed = 0
        self.level: LogLevel | None = None  # of the first suppressed line
        self.call: IDelayedCall | None = None


class LogRate:
    """At most ``burst`` lines of each kind per ``period`` seconds, then one summary line."""

    def __init__(self, clock: IReactorTime, log: Logger, burst: int = BURST, period: float = PERIOD) -> None:
        if burst < 1 or not period > 0:
            raise ValueError("burst must be at least 1 and period positive")
        self.clock = clock
        self.log = log
        self.burst = burst
        self.period = period
        self._windows: dict[str, _Window] = {}

    def emit(self, kind: str, level: LogLevel, format: str, **fields: object) -> bool:
        """Log ``format`` with ``fields`` at ``level`` unless ``kind`` is over its rate; whether it was."""
        now = self.clock.seconds()
        window = self._windows.get(kind)
        if window is None or now >= window.ends:
            if window is not None and window.call is not None:
                # Its summary is due this very moment: say it first, in order.
                window.call.cancel()
                self._summarise(kind, window)
            window = self._windows[kind] = _Window(now + self.period)
        if window.emitted < self.burst:
            window.emitted += 1
            self.log.emit(level, format, **fields)
            return True
        window.suppressed += 1
        if window.level is None:
            window.level = level
        if window.call is None:
            window.call = self.clock.callLater(window.ends - now, self._summarise, kind, window)
        return False

    def suppressed(self, kind: str) -> int:
        """How many lines of ``kind`` the current period has suppressed so far."""
        window = self._windows.get(kind)
        return window.suppressed if window is not None else 0

    def stop(self) -> None:
        """Say what is still suppressed now, and cancel the timers."""
        for kind, window in list(self._windows.items()):
            if window.call is not None:
                window.call.cancel()
                self._summarise(kind, window)
        self._windows.clear()

    def _summarise(self, kind: str, window: _Window) -> None:
        window.call = None
        if self._windows.get(kind) is window:
            del self._windows[kind]
        if window.suppressed:
            assert window.level is not None  # set with the first suppressed line
            self.log.emit(
                window.level,
                "{count} more {kind} lines suppressed in the last {period:g} s",
                count=window.suppressed,
                kind=kind,
                period=self.period,
            )
