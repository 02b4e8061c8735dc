"""
``InFlight``: the Deferreds of work a service has started and not yet seen end, so that
its ``stopService`` (or a graceful stop) can wait for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, succeed

T = TypeVar("T")


class InFlight:
    """A set of Deferreds that forgets each one when it fires, whatever its result."""

    def __init__(self) -> None:
        self._pending: set[Deferred[Any]] = set()

    def track(self, d: Deferred[T]) -> Deferred[T]:
        """Remember ``d`` until it fires; returns ``d`` itself (its result untouched)."""
        if d.called and not d.paused:
            return d
        self._pending.add(d)

        def forget(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(forget)
        return d

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __iter__(self) -> Iterator[Deferred[Any]]:
        return iter(list(self._pending))

    def settled(self) -> Deferred[None]:
        """
        Fires (never fails) once everything tracked now has fired. The tracked Deferreds
        keep their own results for whoever else waits on them.
        """
        if not self._pending:
            return succeed(None)
        watchers = [when_fired(d) for d in list(self._pending)]
        return DeferredList(watchers).addCallback(lambda _: None)


def when_fired(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires with None when ``d`` fires, leaving ``d``'s result to its callers."""
    watcher: Deferred[None] = Deferred()

    def fired(result: object) -> object:
        watcher.callback(None)
        return result

    d.addBoth(fired)
    return watcher
