"""
The agent's presence in etcd (PROTOCOL.md sections 1 and 4): the loop that drives its three
parts, one etcd step at a time.

- ``registration.AgentRegistration``: the agent record and its lease;
- ``secret_store.SecretStore``: the namespace secret;
- ``cluster_config.ClusterConfig``: the tunables under ``config/agent/`` and their watch.

The loop:

    register: read config/agent/ -> bootstrap the secret -> grant a lease -> put the record
              -> watch config/agent/
    then every heartbeat interval: keep the lease alive -> put the record if it changed

Any failure marks the agent unregistered and retries the whole registration with capped,
jittered exponential backoff (a lost lease re-registers at once), so the service never
raises when etcd is away and the record is back soon after etcd answers again.
"""

from __future__ import annotations

import random as random_module
from collections.abc import Callable, Generator
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    inlineCallbacks,
    succeed,
)
from twisted.internet.defer import (
    TimeoutError as DeferredTimeoutError,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.etcd.cluster_config import ClusterConfig
from bai_agent.etcd.interface import EtcdError, IEtcd, IWatch, LeaseNotFound
from bai_agent.etcd.registration import AgentRegistration, lease_ttl_for
from bai_agent.etcd.secret_store import RunBlocking, SecretStore, run_inline
from bai_agent.protocol import keys
from bai_agent.runtime.backoff import Backoff
from bai_agent.runtime.inflight import InFlight

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
STOP_TIMEOUT = 2.0


class _Superseded(Exception):
    """The step belongs to a registration that a failure or a stop has replaced."""


def _caused_by(failure: Failure, *kinds: type[BaseException]) -> bool:
    """``failure.check(*kinds)``, typed."""
    return isinstance(failure.value, kinds)


def _describe(failure: Failure) -> str:
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"


@attrs.frozen
class EtcdHealth:
    registered: bool
    last_error: str | None
    last_heartbeat_at: float | None
    heartbeat_interval: float
    lease_id: int | None


class EtcdService(Service):
    """
    Keeps ``/bai/{namespace}/agents/{agent_id}`` alive under a lease, adopts (or bootstraps)
    the namespace secret and follows ``config/agent/``.

    ``record_source()`` returns the agent record without ``status`` and ``heartbeat_at``,
    which this service sets. ``random`` (a ``random.random``-like callable) jitters the
    backoff. ``run_blocking(function, *args)`` (a Deferred of its result) runs the secret
    cache's file I/O; the default runs it inline, so give it a thread pool's in a daemon.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        etcd: IEtcd,
        namespace: str,
        agent_id: str,
        record_source: Callable[[], Any],
        heartbeat_interval: float = 3.0,
        secret_file: str | None = None,
        secret_cache_path: str | None = None,
        random: Callable[[], float] = random_module.random,
        *,
        run_blocking: RunBlocking = run_inline,
    ) -> None:
        heartbeat_interval = float(heartbeat_interval)
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0, not {heartbeat_interval}")
        self._reactor = reactor
        self._etcd = etcd
        self.namespace = namespace
        self.agent_id = agent_id
        self._backoff = Backoff(  # type: ignore[no-untyped-call]
            random, initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX, jitter=0.5
        )
        self.key_prefix = keys.namespace_prefix(namespace).decode("utf-8")
        self.config_prefix = keys.agent_config_prefix(namespace)
        self.secret_key = keys.secret_key(namespace)
        self.record_key = keys.agent_key(namespace, agent_id)

        self._default_interval = heartbeat_interval
        self.heartbeat_interval = heartbeat_interval
        self.registration = AgentRegistration(reactor, etcd, self.record_key, record_source)
        self.secrets = SecretStore(etcd, self.secret_key, secret_file, secret_cache_path, run_blocking)
        self.config = ClusterConfig(etcd, self.config_prefix, self._cluster_heartbeat_interval)

        self.registered = False
        self.last_error: str | None = None

        self._lock = DeferredLock()
        self._in_flight = InFlight()
        self._retry_call: IDelayedCall | None = None
        self._heartbeat_call: IDelayedCall | None = None
        self._watch: IWatch | None = None
        self._refresh_wanted = False
        # Bumped by every failure and by stop: steps of an older registration see it and
        # give up instead of scheduling more work.
        self._generation = 0
        self._stopping = False

    # -- the parts' state, under the names the rest of the agent reads -----------------

    @property
    def secret(self) -> str | None:
        return self.secrets.secret

    @secret.setter
    def secret(self, value: str | None) -> None:
        self.secrets.secret = value

    @property
    def cluster_config(self) -> dict[str, Any]:
        return self.config.values

    @property
    def lease_id(self) -> int | None:
        return self.registration.lease_id

    @property
    def last_heartbeat_at(self) -> float | None:
        return self.registration.last_heartbeat_at

    @last_heartbeat_at.setter
    def last_heartbeat_at(self, value: float | None) -> None:
        self.registration.last_heartbeat_at = value

    @property
    def heartbeat_delay(self) -> float:
        return self.registration.heartbeat_delay

    @heartbeat_delay.setter
    def heartbeat_delay(self, value: float) -> None:
        self.registration.heartbeat_delay = value

    @property
    def heartbeat_delay_max(self) -> float:
        return self.registration.heartbeat_delay_max

    @heartbeat_delay_max.setter
    def heartbeat_delay_max(self, value: float) -> None:
        self.registration.heartbeat_delay_max = value

    # -- public ----------------------------------------------------------------------

    def health(self) -> EtcdHealth:
        return EtcdHealth(
            self.registered, self.last_error, self.last_heartbeat_at, self.heartbeat_interval, self.lease_id
        )

    def add_config_listener(self, callback: Callable[[str, Any], object]) -> None:
        """Call ``callback(name, value)`` for every later config change (None: removed)."""
        self.config.add_listener(callback)

    def add_secret_listener(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(secret)`` each time the namespace secret changes to another one."""
        self.secrets.add_listener(callback)

    def refresh_now(self) -> Deferred[Any]:
        """
        Put the record at once; fires when done. While (re-)registering, the record is put
        again as soon as the registration completes.
        """
        if self._stopping:
            return succeed(None)
        if not self.registered:
            self._refresh_wanted = True
            return succeed(None)
        self._refresh_wanted = False
        generation = self._generation
        d = self._serialized(self._refresh, generation)
        d.addErrback(self._failed, generation, "refresh")
        d.addErrback(self._bug)
        return d

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._stopping = False
        self._generation += 1
        self._backoff.reset()  # type: ignore[no-untyped-call]
        self.log.info(
            "joining etcd namespace {namespace} as {agent_id}", namespace=self.namespace, agent_id=self.agent_id
        )
        self._connect()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        self._stopping = True
        self._generation += 1
        self._cancel_timers()
        self._drop_watch()
        deadline = self._reactor.seconds() + STOP_TIMEOUT
        d = self._leave(deadline)
        d.addTimeout(STOP_TIMEOUT, self._reactor)

        def unclean(failure: Failure) -> None:
            self.log.warn(
                "could not leave etcd cleanly ({error}); the record expires with its lease", error=_describe(failure)
            )

        def left(_: object) -> None:
            self.registered = False
            self.registration.forget()

        d.addErrback(unclean)
        d.addCallback(left)
        return d

    @inlineCallbacks
    def _leave(self, deadline: float) -> Generator[Deferred[Any], Any, None]:
        """Wait for in-flight work, mark the record stopping, revoke: all by ``deadline``."""

        def bounded(d: Deferred[Any]) -> Deferred[Any]:
            return d.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)

        # A DeferredList of the tracked Deferreds themselves, not InFlight.settled(): the
        # timeout cancels it, and so the steps stuck in etcd calls.
        pending = list(self._in_flight) + list(self.secrets.in_flight)
        if pending:
            yield bounded(DeferredList(pending, consumeErrors=True))
        yield self.registration.leave(bounded)

    # -- plumbing --------------------------------------------------------------------

    def _serialized(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run one etcd step after the previous one finished; tracked for stopService."""
        return self._in_flight.track(self._lock.run(function, *args))

    def _check(self, generation: int) -> None:
        if generation != self._generation or self._stopping:
            raise _Superseded()

    def _checker(self, generation: int) -> Callable[[], None]:
        return lambda: self._check(generation)

    def _cancel_timers(self) -> None:
        for call in (self._retry_call, self._heartbeat_call):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = self._heartbeat_call = None

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _bug(self, failure: Failure) -> None:
        if self._stopping and _caused_by(failure, CancelledError, DeferredTimeoutError, _Superseded):
            return  # work given up by stopService
        self.log.failure("unexpected error in the etcd loop", failure)
        if not self._stopping and self._retry_call is None and self._heartbeat_call is None:
            self._retry_call = self._reactor.callLater(BACKOFF_MAX, self._connect)

    def _failed(self, failure: Failure, generation: int, step: str) -> None:
        if _caused_by(failure, _Superseded) or generation != self._generation or self._stopping:
            return None
        self._generation += 1
        was_registered = self.registered
        self.registered = False
        self.last_error = _describe(failure)
        self._cancel_timers()
        self._drop_watch()
        self.registration.abandon()
        if _caused_by(failure, LeaseNotFound) and step != "register":
            self.log.warn("etcd lost our lease ({error}); registering with a new one", error=self.last_error)
            self._connect()
            return None
        delay = self._backoff.next_delay()
        if _caused_by(failure, EtcdError):
            self.log.warn(
                "etcd {step} failed ({error}){lost}; retrying in {delay:.1f}s",
                step=step,
                error=self.last_error,
                delay=delay,
                lost=", unregistered" if was_registered else "",
            )
        else:
            self.log.error(
                "etcd {step} failed ({error}); retrying in {delay:.1f}s", step=step, error=self.last_error, delay=delay
            )
        self._retry_call = self._reactor.callLater(delay, self._connect)
        return None

    # -- registration ----------------------------------------------------------------

    def _connect(self) -> None:
        self._retry_call = None
        if self._stopping:
            return
        generation = self._generation
        d = self._serialized(self._register, generation)
        d.addCallbacks(
            self._registered_ok, self._failed, callbackArgs=(generation,), errbackArgs=(generation, "register")
        )
        d.addErrback(self._bug)

    @inlineCallbacks
    def _register(self, generation: int) -> Generator[Deferred[Any], Any, None]:
        self._check(generation)
        config = yield self._etcd.get_prefix(self.config_prefix)
        self._check(generation)
        self.config.apply_snapshot(config)
        yield self.secrets.bootstrap()
        self._check(generation)
        yield self.registration.grant(lease_ttl_for(self.heartbeat_interval))
        self._check(generation)
        yield self.registration.put_record("running")
        self._check(generation)
        watch = self.config.watch(
            lambda value: self._secret_changed(generation, value),
            lambda: generation == self._generation and not self._stopping,
        )
        self._watch = watch
        watch.done.addErrback(self._watch_broke, watch, generation)
        yield watch.started
        self._check(generation)
        if watch.done.called:
            raise EtcdError("the config watch ended as it started")

    def _registered_ok(self, _: object, generation: int) -> None:
        if generation != self._generation or self._stopping:
            return
        self.registered = True
        self.last_error = None
        self._backoff.reset()  # type: ignore[no-untyped-call]
        self.log.info(
            "registered {key} under lease {lease_id:x} (TTL {ttl}s)",
            key=self.record_key.decode("utf-8"),
            lease_id=self.lease_id,
            ttl=self.registration.lease_ttl,
        )
        self._schedule_heartbeat(self.heartbeat_interval)
        if lease_ttl_for(self.heartbeat_interval) != self.registration.lease_ttl:
            # The interval changed while registering: the lease must follow.
            self._switch_lease()
        if self.registration.abandoned_leases:
            self._serialized(self.registration.revoke_abandoned).addErrback(self._bug)
        if self._refresh_wanted:
            # Something changed after the registration had put its record.
            self.refresh_now()

    def _watch_broke(self, failure: Failure, watch: IWatch, generation: int) -> None:
        if watch is not self._watch or not self.registered:
            return None  # a registration in progress sees it itself
        self.log.warn("the config watch broke: {error}", error=_describe(failure))
        return self._failed(failure, generation, "config watch")

    # -- heartbeat -------------------------------------------------------------------
    #
    # A callLater chain, not a PeriodicService: the next beat is scheduled only after one
    # succeeded (a failure re-registers instead, with backoff), a registration starts it
    # afresh, and a new interval from the cluster config moves it at once.

    def _schedule_heartbeat(self, delay: float) -> None:
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = self._reactor.callLater(delay, self._heartbeat)
        self.registration.heartbeat_due = self._reactor.seconds() + delay

    def _heartbeat(self) -> None:
        self._heartbeat_call = None
        generation = self._generation
        d = self._serialized(self._beat, generation)
        d.addCallbacks(self._beat_ok, self._failed, callbackArgs=(generation,), errbackArgs=(generation, "heartbeat"))
        d.addErrback(self._bug)

    def _beat(self, generation: int) -> Deferred[None]:
        self._check(generation)
        return self.registration.beat(self._checker(generation))

    def _beat_ok(self, _: object, generation: int) -> None:
        if generation != self._generation or self._stopping:
            return
        if self._heartbeat_call is None:
            self._schedule_heartbeat(self.heartbeat_interval)

    def _refresh(self, generation: int) -> Deferred[None]:
        self._check(generation)
        return self.registration.put_record("running")

    # -- lease TTL changes -----------------------------------------------------------

    def _switch_lease(self) -> None:
        generation = self._generation
        d = self._serialized(self._replace_lease, generation)
        d.addErrback(self._failed, generation, "lease change")
        d.addErrback(self._bug)

    def _replace_lease(self, generation: int) -> Deferred[None]:
        self._check(generation)
        return self.registration.replace_lease(lease_ttl_for(self.heartbeat_interval), self._checker(generation))

    # -- secret ----------------------------------------------------------------------

    def _secret_changed(self, generation: int, value: bytes | None) -> None:
        if self.secrets.changed(value):
            return
        self.log.warn("the namespace secret was deleted from etcd; writing it back")
        d = self._serialized(self._restore_secret, generation)
        d.addErrback(self._failed, generation, "secret restore")
        d.addErrback(self._bug)

    def _restore_secret(self, generation: int) -> Deferred[None]:
        self._check(generation)
        return self.secrets.bootstrap()

    # -- config ----------------------------------------------------------------------

    def _cluster_heartbeat_interval(self, interval: float | None) -> None:
        self._set_heartbeat_interval(self._default_interval if interval is None else interval)

    def _set_heartbeat_interval(self, interval: float) -> None:
        if interval == self.heartbeat_interval:
            return
        self.log.info("heartbeat interval {old}s -> {new}s", old=self.heartbeat_interval, new=interval)
        self.heartbeat_interval = interval
        if not self.registered or self._stopping:
            return  # registration picks it up
        self._schedule_heartbeat(interval)
        if lease_ttl_for(interval) != self.registration.lease_ttl:
            self._switch_lease()
