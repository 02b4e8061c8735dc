"""
One result for several waiters: a kernel's end (``Kernel.terminated``) is awaited by every
destroy of it, by a death and by the take-over, and none may consume it for the others.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def share(d: Deferred[T]) -> Deferred[T]:
    """A new Deferred with the result of ``d`` (which stays usable for others)."""
    shared: Deferred[T] = Deferred()

    def forward(result: Any) -> Any:
        if isinstance(result, Failure):
            shared.errback(result)
        else:
            shared.callback(result)
        return result

    d.addBoth(forward)
    d.addErrback(lambda failure: None)  # the copies carry the failure; this one is done
    return shared


def pass_to(result: Any, d: Deferred[Any]) -> None:
    """Fire ``d`` with ``result`` (a ``Failure`` errbacks it); a callback for ``addBoth``."""
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
