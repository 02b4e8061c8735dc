"""
The narrow view of etcd v3 the agent depends on. Keys and values are bytes.

Two implementations: ``bai_agent.etcd.txetcd.TxEtcd`` (a real server, through txaioetcd)
and ``bai_agent.testing.memory_etcd.MemoryEtcd``; one contract test suite
(``bai_agent.testing.etcd_contract``) runs against both.
"""

from zope.interface import Attribute, Interface


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

    def get(key):
        """Fire with the value (bytes) of ``key``, or None when absent."""

    def get_prefix(prefix):
        """Fire with a dict {key: value} of every key starting with ``prefix``."""

    def put(key, value, lease_id=None):
        """Set ``key`` to ``value``, attached to lease ``lease_id`` when given."""

    def put_if_absent(key, value):
        """
        Atomically create ``key`` with ``value`` if it does not exist (a transaction
        comparing the key's create revision with 0). Fire with the value now stored:
        ``value`` when it was created, the existing value otherwise.
        """

    def delete(key):
        """Delete ``key``; fire with the number of keys deleted."""

    def grant_lease(ttl):
        """Grant a lease of ``ttl`` seconds; fire with its id (int)."""

    def keep_alive(lease_id):
        """Refresh the lease once; fire with its new TTL. ``LeaseNotFound`` if gone."""

    def revoke_lease(lease_id):
        """Revoke the lease (its keys vanish). Revoking an unknown lease is not an error."""

    def watch_prefix(prefix, on_change, start_revision=None):
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

    def cancel():
        """Stop watching."""
