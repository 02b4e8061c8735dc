"""
The pool of host TCP ports the agent listens on for services (``--service-port-range``).

Pure bookkeeping on an injected clock: the pool binds nothing. The relay binds, and a port
that something else on the machine already holds is put back into cool-down and the next
one tried (``allocate_bound``). A released port rests for ``cooldown`` seconds before it is
handed out again, so that a client that still holds the old address does not reach another
kernel's new service; ports are handed out round-robin for the same reason.
"""

from collections.abc import Callable, Hashable
from typing import Any, Optional, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime

__all__ = ["PortPool", "PortTaken", "PortsError", "PortsExhausted"]

T = TypeVar("T")


class PortsError(Exception):
    """Base of the port pool's errors."""


class PortsExhausted(PortsError):
    """Every port of the range is in use or cooling down."""


class PortTaken(PortsError):
    """The port asked for is held by an owner, or cooling down after a release."""


class PortPool:
    """
    Host ports ``low..high`` (both included), each held by at most one owner (any hashable:
    a kernel id, a ``(kernel, service)`` pair).

    :param clock: the time the cool-down is measured on.
    :param cooldown: seconds a released port rests before it may be handed out again.
    """

    def __init__(self, clock: IReactorTime, low: int, high: int, cooldown: float = 30.0) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port range {low}..{high} is not within 1..65535")
        if cooldown < 0:
            raise ValueError(f"cooldown {cooldown} is negative")
        self._clock = clock
        self.low = low
        self.high = high
        self.cooldown = cooldown
        self._owners: dict[int, Hashable] = {}
        self._cooling: dict[int, float] = {}  # port -> when it may be handed out again
        self._next = low

    @property
    def size(self) -> int:
        """How many ports the range has."""
        return self.high - self.low + 1

    @property
    def in_use(self) -> int:
        """How many ports are held now (for the metrics)."""
        return len(self._owners)

    def owner_of(self, port: int) -> Optional[Hashable]:
        """The owner holding ``port``, or ``None``."""
        return self._owners.get(port)

    def owned_by(self, owner: Hashable) -> list[int]:
        """The ports ``owner`` holds, in order."""
        return sorted(port for port, holder in self._owners.items() if holder == owner)

    def is_cooling(self, port: int) -> bool:
        """Whether ``port`` was released less than ``cooldown`` seconds ago."""
        ready_at = self._cooling.get(port)
        if ready_at is None:
            return False
        if self._clock.seconds() >= ready_at:
            del self._cooling[port]
            return False
        return True

    def allocate(self, owner: Hashable) -> int:
        """
        A free port of the range for ``owner``, the next one after the last handed out.
        Raises ``PortsExhausted`` when every port is held or cooling down.
        """
        for offset in range(self.size):
            port = self.low + (self._next - self.low + offset) % self.size
            if port not in self._owners and not self.is_cooling(port):
                self._owners[port] = owner
                self._next = port + 1 if port < self.high else self.low
                return port
        raise PortsExhausted(
            f"all {self.size} service ports {self.low}..{self.high} are in use or cooling down ({self.in_use} in use)"
        )

    def reserve(self, port: int, owner: Hashable) -> None:
        """
        Claim a known ``port`` for ``owner`` (the take-over restoring a relay on the port
        clients already have). A port outside the range is accepted: the range may have
        changed across the restart, and the kernel keeps its port until it ends. Raises
        ``PortTaken`` if another owner holds it or it is cooling down; reserving a port the
        same owner already holds is a no-op.
        """
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not within 1..65535")
        holder = self._owners.get(port)
        if holder is not None:
            if holder == owner:
                return
            raise PortTaken(f"port {port} is already in use")
        if self.is_cooling(port):
            raise PortTaken(f"port {port} was released less than {self.cooldown:g}s ago")
        self._owners[port] = owner

    def release(self, port: int) -> bool:
        """
        Give ``port`` back; it rests for ``cooldown`` seconds first. Releasing a port no one
        holds does nothing (teardown paths may release twice); answers whether it was held.
        """
        if self._owners.pop(port, None) is None:
            return False
        if self.cooldown > 0:
            self._cooling[port] = self._clock.seconds() + self.cooldown
        return True

    def release_owner(self, owner: Hashable) -> list[int]:
        """Release every port ``owner`` holds (its kernel ended); the ports released."""
        ports = self.owned_by(owner)
        for port in ports:
            self.release(port)
        return ports

    @inlineCallbacks
    def allocate_bound(
        self,
        owner: Hashable,
        bind: Callable[[int], "Deferred[T]"],
        taken: tuple[type[BaseException], ...] = (CannotListenError,),
    ) -> Any:
        """
        Allocate a port and ``bind(port)`` on it (the relay's ``listen``); a port that fails
        with one of ``taken`` (something outside the agent holds it) is released into
        cool-down and the next one tried, at most once per port of the range. Fires with
        ``(port, what bind fired with)``; fails with ``PortsExhausted`` when no port binds,
        or with any other error of ``bind`` (after releasing its port).
        """
        for _ in range(self.size):
            port = self.allocate(owner)
            try:
                result = yield bind(port)
            except taken:
                self.release(port)
                continue
            except BaseException:
                self.release(port)
                raise
            return (port, result)
        raise PortsExhausted(f"no port of {self.low}..{self.high} could be bound")
