"""
Waiting in tests that run the real reactor (functional and fault tests, under
``pytest_twisted``): ``sleep`` for a while, ``wait_until`` a quick predicate is true,
``wait_until_blocking`` for a predicate that blocks (an HTTP or Docker call, run in the
reactor's thread pool), and ``block_until`` for tests that run no reactor at all.

Every wait is bounded and fails with an ``AssertionError`` naming what it waited for. The
reactor is always a parameter: nothing here imports the global reactor.
"""

import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool

__all__ = ["block_until", "blocking", "sleep", "wait_until", "wait_until_blocking"]

T = TypeVar("T")


def sleep(reactor: IReactorTime, seconds: float) -> "Deferred[None]":
    """A Deferred that fires with ``None`` after ``seconds`` on ``reactor``."""
    return deferLater(reactor, seconds, lambda: None)


def blocking(reactor: IReactorThreads, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
    """Run blocking ``f`` in the reactor's thread pool; a Deferred of its result."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


def _timed_out(timeout: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout}s waiting for {what}")


@inlineCallbacks
def wait_until(
    reactor: IReactorTime, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05
) -> Generator["Deferred[Any]", Any, T]:
    """
    Call ``predicate()`` (quick, non-blocking: it runs on the reactor thread) every
    ``interval`` seconds until its value is true, and fire with that value; fail with an
    ``AssertionError`` after ``timeout`` seconds. The predicate is always asked once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        yield sleep(reactor, interval)


@inlineCallbacks
def wait_until_blocking(
    reactor: Any, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1
) -> Generator["Deferred[Any]", Any, T]:
    """``wait_until`` for a predicate that blocks: each call runs in the reactor's thread pool."""
    deadline = time.monotonic() + timeout
    while True:
        value = yield blocking(reactor, predicate)
        if value:
            return value  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        yield sleep(reactor, interval)


def block_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """``wait_until`` for a test without a reactor: sleeps the calling thread between calls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        time.sleep(interval)
