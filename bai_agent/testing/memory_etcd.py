"""
An in-memory ``IEtcd`` for tests: deterministic, synchronous, no reactor.

Every call answers with an already-fired Deferred and watchers are called synchronously,
in order, before the mutating call returns. Lease lifetimes run on an injectable
``IReactorTime`` (``task.Clock`` in tests): when a lease expires its keys vanish and
watchers see deletions. ``set_available(False)`` simulates an outage: calls fail with
``EtcdUnavailable`` and open watches fail their ``done``; leases keep ageing meanwhile, as
they would on a real server that nobody reaches.
"""

import itertools
from typing import Any

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bai_agent.etcd.interface import (
    EtcdError,
    EtcdUnavailable,
    IEtcd,
    IWatch,
    LeaseNotFound,
)

FIRST_LEASE_ID = 0x694D0000  # arbitrary but stable, so test output is reproducible
HISTORY_LIMIT = 10000


def _check_bytes(name, value):
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


@attr.s(frozen=True, slots=True)
class StoredValue:
    """What MemoryEtcd keeps for one key."""

    value = attr.ib(type=bytes)
    lease_id = attr.ib(default=None)
    create_revision = attr.ib(type=int, default=0)
    mod_revision = attr.ib(type=int, default=0)


@attr.s(frozen=True, slots=True)
class WatchEvent:
    revision = attr.ib(type=int)
    key = attr.ib(type=bytes)
    value = attr.ib()  # bytes, or None for a deletion


class _Lease:
    def __init__(self, lease_id, ttl, expiry):
        self.lease_id = lease_id
        self.ttl = ttl
        self.expiry = expiry  # IDelayedCall
        self.keys = set()


@implementer(IWatch)
class _MemoryWatch:
    log = Logger()

    def __init__(self, etcd, prefix, on_change):
        self._etcd = etcd
        self.prefix = prefix
        self._on_change = on_change
        self.started = succeed(None)
        self.done: Deferred[Any] = Deferred()

    @property
    def active(self):
        return not self.done.called

    def _deliver(self, key, value):
        if not self.active or not key.startswith(self.prefix):
            return
        try:
            self._on_change(key, value)
        except Exception:
            self.log.failure("watch callback failed on {key!r}", key=key)

    def _fail(self, problem):
        if self.active:
            self._etcd._forget_watch(self)
            self.done.errback(Failure(problem))

    def cancel(self):
        if self.active:
            self._etcd._forget_watch(self)
            self.done.callback(None)


@implementer(IEtcd)
class MemoryEtcd:
    """
    ``IEtcd`` in memory. ``clock`` drives lease expiry; by default a private
    ``task.Clock`` that only moves when a test advances it.
    """

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else Clock()
        self._data = {}
        self._leases = {}
        self._watches = []
        self._history = []
        self._revision = 0
        self._available = True
        self._lease_ids = itertools.count(FIRST_LEASE_ID)

    # -- test controls and inspection ------------------------------------------------

    @property
    def available(self):
        return self._available

    def set_available(self, available):
        """Simulate an outage (False) or its end (True)."""
        self._available = bool(available)
        if not self._available:
            for watch in list(self._watches):
                watch._fail(EtcdUnavailable("MemoryEtcd: simulated outage"))

    def break_watches(self, problem=None):
        """Fail every open watch's ``done`` as if its stream broke; etcd stays up."""
        for watch in list(self._watches):
            watch._fail(problem or EtcdError("MemoryEtcd: watch stream broken"))

    @property
    def revision(self):
        return self._revision

    def items(self):
        """A copy of every key and value."""
        return {key: stored.value for key, stored in self._data.items()}

    def stored(self, key):
        """The ``StoredValue`` of ``key`` (value, lease, revisions), or None."""
        return self._data.get(key)

    def lease_of(self, key):
        stored = self._data.get(key)
        return stored.lease_id if stored is not None else None

    def lease_ttl(self, lease_id):
        """The TTL ``lease_id`` was granted with, or None if it does not exist."""
        lease = self._leases.get(lease_id)
        return lease.ttl if lease is not None else None

    def lease_remaining(self, lease_id):
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        return lease.expiry.getTime() - self.clock.seconds()

    @property
    def lease_ids(self):
        return set(self._leases)

    @property
    def open_watches(self):
        return len(self._watches)

    # -- internals -------------------------------------------------------------------

    def _unavailable(self):
        return None if self._available else fail(EtcdUnavailable("MemoryEtcd: simulated outage"))

    def _record(self, key, value):
        self._revision += 1
        self._history.append(WatchEvent(self._revision, key, value))
        del self._history[:-HISTORY_LIMIT]

    def _notify(self, key, value):
        for watch in list(self._watches):
            watch._deliver(key, value)

    def _store(self, key, value, lease_id):
        previous = self._data.get(key)
        if previous is not None and previous.lease_id in self._leases:
            self._leases[previous.lease_id].keys.discard(key)
        self._record(key, value)
        create_revision = previous.create_revision if previous is not None else self._revision
        self._data[key] = StoredValue(value, lease_id, create_revision, self._revision)
        if lease_id is not None:
            self._leases[lease_id].keys.add(key)
        self._notify(key, value)

    def _remove(self, key):
        stored = self._data.pop(key, None)
        if stored is None:
            return 0
        if stored.lease_id in self._leases:
            self._leases[stored.lease_id].keys.discard(key)
        self._record(key, None)
        self._notify(key, None)
        return 1

    def _end_lease(self, lease_id):
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.expiry.active():
            lease.expiry.cancel()
        for key in sorted(lease.keys):
            self._remove(key)

    def _forget_watch(self, watch):
        if watch in self._watches:
            self._watches.remove(watch)

    # -- IEtcd -----------------------------------------------------------------------

    def get(self, key):
        _check_bytes("key", key)
        stored = self._data.get(key)
        return self._unavailable() or succeed(stored.value if stored is not None else None)

    def get_prefix(self, prefix):
        _check_bytes("prefix", prefix)
        return self._unavailable() or succeed(
            {key: stored.value for key, stored in sorted(self._data.items()) if key.startswith(prefix)}
        )

    def put(self, key, value, lease_id=None):
        _check_bytes("key", key)
        _check_bytes("value", value)
        down = self._unavailable()
        if down:
            return down
        if lease_id is not None and lease_id not in self._leases:
            return fail(LeaseNotFound(f"lease {lease_id:x} not found"))
        self._store(key, value, lease_id)
        return succeed(None)

    def put_if_absent(self, key, value):
        _check_bytes("key", key)
        _check_bytes("value", value)
        down = self._unavailable()
        if down:
            return down
        stored = self._data.get(key)
        if stored is not None:
            return succeed(stored.value)
        self._store(key, value, None)
        return succeed(value)

    def delete(self, key):
        _check_bytes("key", key)
        return self._unavailable() or succeed(self._remove(key))

    def grant_lease(self, ttl):
        down = self._unavailable()
        if down:
            return down
        ttl = int(ttl)
        if ttl < 1:
            return fail(EtcdError(f"lease TTL must be at least 1 second, not {ttl}"))
        lease_id = next(self._lease_ids)
        expiry = self.clock.callLater(ttl, self._end_lease, lease_id)
        self._leases[lease_id] = _Lease(lease_id, ttl, expiry)
        return succeed(lease_id)

    def keep_alive(self, lease_id):
        down = self._unavailable()
        if down:
            return down
        lease = self._leases.get(lease_id)
        if lease is None:
            return fail(LeaseNotFound(f"lease {lease_id:x} not found"))
        lease.expiry.reset(lease.ttl)
        return succeed(lease.ttl)

    def revoke_lease(self, lease_id):
        down = self._unavailable()
        if down:
            return down
        self._end_lease(lease_id)
        return succeed(None)

    def watch_prefix(self, prefix, on_change, start_revision=None):
        _check_bytes("prefix", prefix)
        watch = _MemoryWatch(self, prefix, on_change)
        if not self._available:
            watch.started = fail(EtcdUnavailable("MemoryEtcd: simulated outage"))
            watch.done.errback(Failure(EtcdUnavailable("MemoryEtcd: simulated outage")))
            return watch
        self._watches.append(watch)
        if start_revision is not None:
            for event in list(self._history):
                if event.revision >= start_revision:
                    watch._deliver(event.key, event.value)
        return watch

    def close(self):
        for watch in list(self._watches):
            watch.cancel()
        return succeed(None)
