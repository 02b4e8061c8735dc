"""
The agent record and its lease (PROTOCOL.md section 4): ``/bai/{ns}/agents/{agent_id}``,
attached to a lease of ``max(10, 3 x heartbeat interval)`` seconds.

Liveness is the lease, kept alive every heartbeat; the record is rewritten only when it
changed, or every ``FULL_RECORD_EVERY`` seconds, so etcd's load does not grow with the
heartbeat rate. A lease's TTL cannot change: a new interval moves the record to a new lease.
A stop marks the record ``stopping`` and revokes the lease, so the record goes at once.

Each method is one etcd step of ``EtcdService``'s loop, which serialises them; ``check`` is
the loop's "is this step still wanted" test, raising when a failure or a stop superseded it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bai_agent.etcd.interface import EtcdError, IEtcd, LeaseNotFound

MIN_LEASE_TTL = 10

# The record is written in full when it changes and at least this often (seconds); the
# heartbeats between only keep the lease alive.
FULL_RECORD_EVERY = 60.0

RecordSource = Callable[[], Mapping[str, Any]]


def lease_ttl_for(heartbeat_interval: float) -> int:
    """The record's lease TTL: three heartbeats, at least ``MIN_LEASE_TTL`` seconds."""
    return max(MIN_LEASE_TTL, int(math.ceil(3 * heartbeat_interval)))


class AgentRegistration:
    """
    The record at ``record_key`` and the lease it is attached to (``lease_id``, None when
    there is none). ``record_source()`` returns the record without ``status`` and
    ``heartbeat_at``, which this sets.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, etcd: IEtcd, record_key: bytes, record_source: RecordSource) -> None:
        self._clock = clock
        self._etcd = etcd
        self.record_key = record_key
        self._record_source = record_source
        self.lease_id: int | None = None
        self.lease_ttl: int | None = None
        # Leases of failed registrations and of TTL changes, not revoked yet.
        self.abandoned_leases: list[int] = []
        self.last_heartbeat_at: float | None = None
        # How late the last keep-alive was answered against its schedule, and the worst.
        self.heartbeat_delay = 0.0
        self.heartbeat_delay_max = 0.0
        self.heartbeat_due: float | None = None
        self._written_record: dict[str, Any] | None = None  # the last full put, without heartbeat_at
        self._written_at = 0.0

    # -- the lease -------------------------------------------------------------------

    @inlineCallbacks
    def grant(self, ttl: int) -> Generator[Deferred[Any], Any, None]:
        """A new lease of ``ttl`` seconds for the record."""
        self.lease_id = yield self._etcd.grant_lease(ttl)
        self.lease_ttl = ttl

    def abandon(self) -> None:
        """Forget the lease (a failure): it is revoked later, or expires."""
        if self.lease_id is not None:
            self.abandoned_leases.append(self.lease_id)
            self.lease_id = None
            self.lease_ttl = None

    def forget(self) -> None:
        """The lease is gone (revoked, or left to expire at a stop)."""
        self.lease_id = None
        self.lease_ttl = None

    @inlineCallbacks
    def revoke_abandoned(self) -> Generator[Deferred[Any], Any, None]:
        # Leases of failed registrations: the record moved to the new lease, so revoking
        # them early only saves etcd the wait.
        leases, self.abandoned_leases = self.abandoned_leases, []
        for lease_id in leases:
            try:
                yield self._etcd.revoke_lease(lease_id)
            except EtcdError as error:
                self.log.debug("could not revoke old lease {lease_id:x}: {error}", lease_id=lease_id, error=error)

    @inlineCallbacks
    def replace_lease(self, ttl: int, check: Callable[[], None]) -> Generator[Deferred[Any], Any, None]:
        """A lease's TTL cannot change: move the record to a new lease, revoke the old."""
        if ttl == self.lease_ttl:
            return
        new_lease: int = yield self._etcd.grant_lease(ttl)
        old_lease = self.lease_id
        if old_lease is not None:
            self.abandoned_leases.append(old_lease)
        self.lease_id, self.lease_ttl = new_lease, ttl
        check()
        yield self.put_record("running")
        if old_lease is not None:
            yield self._etcd.revoke_lease(old_lease)
            if old_lease in self.abandoned_leases:
                self.abandoned_leases.remove(old_lease)
        self.log.info("moved the record to lease {lease_id:x} (TTL {ttl}s)", lease_id=new_lease, ttl=ttl)

    # -- heartbeat -------------------------------------------------------------------

    @inlineCallbacks
    def beat(self, check: Callable[[], None]) -> Generator[Deferred[Any], Any, None]:
        """
        Keep the lease alive: that is the short refresh, every interval. The record itself
        is written only when it changed, or every ``FULL_RECORD_EVERY`` seconds.
        """
        if self.lease_id is None:  # a failure abandons the lease and supersedes the beat first
            raise LeaseNotFound("no lease to keep alive")
        yield self._etcd.keep_alive(self.lease_id)
        self._note_heartbeat_delay()
        self.last_heartbeat_at = self._clock.seconds()
        check()
        record = self._current_record("running")
        if record != self._written_record or self._clock.seconds() - self._written_at >= FULL_RECORD_EVERY:
            yield self._put(record)

    def _note_heartbeat_delay(self) -> None:
        if self.heartbeat_due is None:
            return
        self.heartbeat_delay = max(0.0, self._clock.seconds() - self.heartbeat_due)
        self.heartbeat_delay_max = max(self.heartbeat_delay_max, self.heartbeat_delay)

    # -- the record ------------------------------------------------------------------

    def _current_record(self, status: str) -> dict[str, Any]:
        record = dict(self._record_source())
        record.pop("heartbeat_at", None)
        if status != "running" or "status" not in record:
            record["status"] = status
        return record

    def put_record(self, status: str) -> Deferred[None]:
        """Write the record in full with ``status`` (``running`` or ``stopping``)."""
        return self._put(self._current_record(status))

    @inlineCallbacks
    def _put(self, record: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        now = self._clock.seconds()
        body = json.dumps(dict(record, heartbeat_at=now), sort_keys=True).encode("utf-8")
        self._written_record = None
        yield self._etcd.put(self.record_key, body, lease_id=self.lease_id)
        self._written_record = record
        self._written_at = self.last_heartbeat_at = now

    # -- leaving ---------------------------------------------------------------------

    @inlineCallbacks
    def leave(self, bounded: Callable[[Deferred[Any]], Deferred[Any]]) -> Generator[Deferred[Any], Any, None]:
        """Mark the record stopping and revoke the lease, each step cut short by ``bounded``."""
        lease_id = self.lease_id
        if lease_id is None:
            return
        try:
            yield bounded(self.put_record("stopping"))
        except EtcdError as error:
            self.log.warn("could not mark the record stopping: {error}", error=error)
        yield bounded(self._etcd.revoke_lease(lease_id))
        self.log.info("left etcd: revoked lease {lease_id:x}", lease_id=lease_id)
