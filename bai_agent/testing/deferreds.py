"""
Reading Deferreds that have already fired, for tests on ``task.Clock``, ``MemoryReactor``
and the fakes (which answer synchronously): no reactor runs, so a test asks a Deferred for
what it holds now, and a Deferred that has not fired is a failed assertion, not a hang.

``result_of``, ``failure_of`` and ``error_of`` consume the result (as trial's ``successResultOf`` does):
the Deferred holds ``None`` afterwards, and a failure read here is handled, never logged as
unhandled. ``has_fired`` only looks, and passes the result on.
"""

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["error_of", "failure_of", "has_fired", "result_of"]


def _fired_with(d: "Deferred[Any]", what: str) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"the Deferred has not fired (expected {what}): {d!r}")
    return results[0]


def result_of(d: "Deferred[Any]") -> Any:
    """The result of ``d``, which has fired; its failure, if it failed, is raised here."""
    result = _fired_with(d, "a result")
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failure_of(d: "Deferred[Any]", *expected: type[BaseException]) -> Failure:
    """
    The ``Failure`` of ``d``, which has failed; with ``expected`` exception types, one of
    them (or a subclass). A Deferred that succeeded, or failed otherwise, fails the test.
    """
    result = _fired_with(d, "a failure")
    if not isinstance(result, Failure):
        raise AssertionError(f"the Deferred succeeded with {result!r}; a failure was expected")
    if expected and not result.check(*expected):
        names = ", ".join(t.__name__ for t in expected)
        raise AssertionError(f"the Deferred failed with {result.value!r}, not with {names}")
    return result


def error_of(d: "Deferred[Any]", *expected: type[BaseException]) -> BaseException:
    """The exception ``d`` failed with (``failure_of(d, *expected).value``)."""
    error = failure_of(d, *expected).value
    assert error is not None
    return error


def has_fired(d: "Deferred[Any]") -> bool:
    """Whether ``d``'s result has reached the end of its chain; the result is kept in ``d``."""
    seen: list[Any] = []

    def look(result: Any) -> Any:
        seen.append(result)
        return result

    d.addBoth(look)
    return bool(seen)
