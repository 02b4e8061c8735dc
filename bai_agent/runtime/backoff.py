"""Retry delays shared by the services that reconnect (Docker, etcd)."""

from typing import Callable


class Backoff:
    """
    Delays for retrying: ``initial`` seconds doubling up to ``maximum``, each shortened by
    up to ``jitter`` (a fraction) so that agents restarted together spread out. ``random``
    is a ``random.random``-like callable: 1.0 gives the full delay, 0.0 the shortest.
    """

    def __init__(
        self, random: Callable[[], float], initial: float = 1.0, maximum: float = 30.0, jitter: float = 0.2
    ) -> None:
        self._random = random
        self._initial = initial
        self._maximum = maximum
        self._jitter = jitter
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self._maximum, self._initial * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return base * (1.0 - self._jitter * (1.0 - self._random()))

    def reset(self) -> None:
        self.attempts = 0
