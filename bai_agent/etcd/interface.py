"""
The narrow view of etcd v3 the agent depends on. Keys and values are bytes.

Two implementations: ``bai_agent.etcd.txetcd.TxEtcd`` (a real server, through txaioetcd)
and ``bai_agent.testing.memory_etcd.MemoryEtcd``; one contract test suite
(``bai_agent.testing.etcd_contract``) runs against both.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

# ``on_change(key, value)``: value None for a deletion.
WatchCallback = Callable[[bytes, "bytes | None"], object]


class EtcdError(Exception):
    """etcd answered with an error, or an unexpected document."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached (refused, timed out, connection lost)."""


class LeaseNotFound(EtcdError):
    """The lease has expired or was revoked; keys attached to it are gone."""


class IEtcd(Interface):
    """
    Every method returns a Deferred and fails only with ``EtcdError`` (or a subclass).
    """

    def get(key: bytes) -> Deferred[bytes | None]:
        """Fire with the value (bytes) of ``key``, or None when absent."""

    def get_prefix(prefix: bytes) -> Deferred[dict[bytes, bytes]]:
        """Fire with a dict {key: value} of every key starting with ``prefix``."""

    def put(key: bytes, value: bytes, lease_id: int | None = None) -> Deferred[None]:
        """Set ``key`` to ``value``, attached to lease ``lease_id`` when given."""

    def put_if_absent(key: bytes, value: bytes) -> Deferred[bytes]:
        """
        Atomically create ``key`` with ``value`` if it does not exist (a transaction
        comparing the key's create revision with 0). Fire with the value now stored:
        ``value`` when it was created, the existing value otherwise.
        """

    def delete(key: bytes) -> Deferred[int]:
        """Delete ``key``; fire with the number of keys deleted."""

    def grant_lease(ttl: int) -> Deferred[int]:
        """Grant a lease of ``ttl`` seconds; fire with its id (int)."""

    def keep_alive(lease_id: int) -> Deferred[int]:
        """Refresh the lease once; fire with its new TTL. ``LeaseNotFound`` if gone."""

    def revoke_lease(lease_id: int) -> Deferred[None]:
        """Revoke the lease (its keys vanish). Revoking an unknown lease is not an error."""

    def watch_prefix(prefix: bytes, on_change: WatchCallback, start_revision: int | None = None) -> IWatch:
        """
        Watch every key under ``prefix``. ``on_change(key, value)`` is called for each
        change in order, with ``value`` None for a deletion. Returns an ``IWatch`` at
        once.
        """


class IWatch(Interface):
    started = Attribute("Deferred: fires once the server has accepted the watch.")
    done = Attribute(
        "Deferred: fires with None when cancelled, fails with EtcdError when the "
        "stream broke (the caller re-reads and watches again)."
    )

    def cancel() -> None:
        """Stop watching."""
