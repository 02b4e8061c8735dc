"""
The agent's presence in etcd: its record under a lease, the namespace secret and the
cluster-wide agent config (PROTOCOL.md sections 1 and 4).

One loop does everything, one etcd step at a time:

    register: read config/agent/ -> bootstrap the secret -> grant a lease -> put the record
              -> watch config/agent/
    then every heartbeat interval: keep the lease alive -> put the refreshed record

Any failure marks the agent unregistered and retries the whole registration with capped,
jittered exponential backoff (a lost lease re-registers at once), so the service never
raises when etcd is away and the record is back soon after etcd answers again.
"""

import json
import math
import os
import random as random_module
import re
import secrets
import tempfile

import attr
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    DeferredList,
    DeferredLock,
    inlineCallbacks,
    succeed,
)
from twisted.internet.defer import (
    TimeoutError as DeferredTimeoutError,
)
from twisted.logger import Logger

from bai_agent.config import parse_heartbeat_interval, parse_timeout
from bai_agent.etcd.interface import EtcdError, LeaseNotFound
from bai_agent.runtime.backoff import Backoff

MIN_LEASE_TTL = 10
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
STOP_TIMEOUT = 2.0
SECRET_NAME = "secret"
_SECRET_PATTERN = re.compile(r"[0-9a-fA-F]{64,}\Z")


class InvalidSecret(ValueError):
    """A secret that is not hex of at least 64 digits (32 bytes of entropy)."""


class _Superseded(Exception):
    """The step belongs to a registration that a failure or a stop has replaced."""


# The record is written in full when it changes and at least this often (seconds); the
# heartbeats between only keep the lease alive.
FULL_RECORD_EVERY = 60.0


def lease_ttl_for(heartbeat_interval):
    """The record's lease TTL: three heartbeats, at least ``MIN_LEASE_TTL`` seconds."""
    return max(MIN_LEASE_TTL, int(math.ceil(3 * heartbeat_interval)))


def is_valid_secret(text):
    return isinstance(text, str) and _SECRET_PATTERN.match(text) is not None


def read_secret_file(path):
    """The secret in ``path`` (whitespace stripped); ``ValueError`` naming the file if bad."""
    try:
        with open(path, encoding="utf-8") as secret_file:
            text = secret_file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the secret file {path}: {error}")
    if not is_valid_secret(text):
        raise ValueError(f"the secret file {path} must hold at least 64 hex digits (32 bytes)")
    return text


def write_secret_cache(path, secret):
    """Write ``secret`` to ``path`` atomically, readable by the owner only."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".secret-", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as cache:
            cache.write(secret + "\n")
            cache.flush()
            os.fsync(cache.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


# The same checks as the command line's and a manager's: a value in etcd is no more trusted.
CONFIG_PARSERS = {
    "heartbeat_interval": parse_heartbeat_interval,
    "idle_timeout": parse_timeout,
    "exec_timeout": parse_timeout,
}


def parse_config_value(name, raw):
    """A validated tunable (``ValueError`` if invalid); unknown names stay raw strings."""
    text = raw.decode("utf-8")
    parser = CONFIG_PARSERS.get(name)
    if parser is None:
        return text
    return parser(text.strip())


def _describe(failure):
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EtcdHealth:
    registered: bool
    last_error: "str | None"
    last_heartbeat_at: "float | None"
    heartbeat_interval: float
    lease_id: "int | None"


_MISSING = object()


class EtcdService(Service):
    """
    Keeps ``/bai/{namespace}/agents/{agent_id}`` alive under a lease, adopts (or bootstraps)
    the namespace secret and follows ``config/agent/``.

    ``record_source()`` returns the agent record without ``status`` and ``heartbeat_at``,
    which this service sets. ``random`` (a ``random.random``-like callable) jitters the
    backoff.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        etcd,
        namespace,
        agent_id,
        record_source,
        heartbeat_interval=3.0,
        secret_file=None,
        secret_cache_path=None,
        random=random_module.random,
    ):
        heartbeat_interval = float(heartbeat_interval)
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0, not {heartbeat_interval}")
        self._reactor = reactor
        self._etcd = etcd
        self.namespace = namespace
        self.agent_id = agent_id
        self._record_source = record_source
        self._backoff = Backoff(random, initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX, jitter=0.5)
        self.key_prefix = f"/bai/{namespace}/"
        self.config_prefix = (self.key_prefix + "config/agent/").encode("utf-8")
        self.secret_key = self.config_prefix + SECRET_NAME.encode("ascii")
        self.record_key = (self.key_prefix + "agents/" + agent_id).encode("utf-8")

        self._default_interval = heartbeat_interval
        self.heartbeat_interval = heartbeat_interval
        self.cluster_config = {}
        self._config_listeners = []
        self._secret_listeners = []

        self._secret_from_file = secret_file is not None
        self.secret = read_secret_file(secret_file) if secret_file is not None else None
        self._secret_cache_path = secret_cache_path

        self.registered = False
        self.last_error = None
        self.last_heartbeat_at = None
        # How late the last keep-alive was answered against its schedule, and the worst.
        self.heartbeat_delay = 0.0
        self.heartbeat_delay_max = 0.0
        self._heartbeat_due = None
        self._written_record = None  # what the last full put held, without heartbeat_at
        self._written_at = 0.0
        self.lease_id = None
        self._lease_ttl = None
        self._abandoned_leases = []

        self._lock = DeferredLock()
        self._pending = set()
        self._retry_call = None
        self._heartbeat_call = None
        self._watch = None
        self._backoff.reset()
        self._refresh_wanted = False
        # Bumped by every failure and by stop: steps of an older registration see it and
        # give up instead of scheduling more work.
        self._generation = 0
        self._stopping = False

    # -- public ----------------------------------------------------------------------

    def health(self):
        return EtcdHealth(
            self.registered, self.last_error, self.last_heartbeat_at, self.heartbeat_interval, self.lease_id
        )

    def add_config_listener(self, callback):
        """Call ``callback(name, value)`` for every later config change (None: removed)."""
        self._config_listeners.append(callback)

    def add_secret_listener(self, callback):
        """Call ``callback(secret)`` each time the namespace secret changes to another one."""
        self._secret_listeners.append(callback)

    def refresh_now(self):
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

    def startService(self):
        Service.startService(self)
        self._stopping = False
        self._generation += 1
        self._backoff.reset()
        self.log.info(
            "joining etcd namespace {namespace} as {agent_id}", namespace=self.namespace, agent_id=self.agent_id
        )
        self._connect()

    def stopService(self):
        Service.stopService(self)
        self._stopping = True
        self._generation += 1
        self._cancel_timers()
        self._drop_watch()
        deadline = self._reactor.seconds() + STOP_TIMEOUT
        d = self._leave(deadline)
        d.addTimeout(STOP_TIMEOUT, self._reactor)

        def unclean(failure):
            self.log.warn(
                "could not leave etcd cleanly ({error}); the record expires with its lease", error=_describe(failure)
            )

        def left(_):
            self.registered = False
            self.lease_id = None
            self._lease_ttl = None

        d.addErrback(unclean)
        d.addCallback(left)
        return d

    @inlineCallbacks
    def _leave(self, deadline):
        """Wait for in-flight work, mark the record stopping, revoke: all by ``deadline``."""

        def bounded(d):
            return d.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)

        pending = list(self._pending)
        if pending:
            yield bounded(DeferredList(pending, consumeErrors=True))
        lease_id = self.lease_id
        if lease_id is None:
            return
        try:
            yield bounded(self._put_record("stopping"))
        except EtcdError as error:
            self.log.warn("could not mark the record stopping: {error}", error=error)
        yield bounded(self._etcd.revoke_lease(lease_id))
        self.log.info("left etcd: revoked lease {lease_id:x}", lease_id=lease_id)

    # -- plumbing --------------------------------------------------------------------

    def _serialized(self, function, *args):
        """Run one etcd step after the previous one finished; tracked for stopService."""
        d = self._lock.run(function, *args)
        self._pending.add(d)

        def forget(result):
            self._pending.discard(d)
            return result

        d.addBoth(forget)
        return d

    def _check(self, generation):
        if generation != self._generation or self._stopping:
            raise _Superseded()

    def _cancel_timers(self):
        for name in ("_retry_call", "_heartbeat_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    def _drop_watch(self):
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _bug(self, failure):
        if self._stopping and failure.check(CancelledError, DeferredTimeoutError, _Superseded):
            return  # work given up by stopService
        self.log.failure("unexpected error in the etcd loop", failure)
        if not self._stopping and self._retry_call is None and self._heartbeat_call is None:
            self._retry_call = self._reactor.callLater(BACKOFF_MAX, self._connect)

    def _failed(self, failure, generation, step):
        if failure.check(_Superseded) or generation != self._generation or self._stopping:
            return None
        self._generation += 1
        was_registered = self.registered
        self.registered = False
        self.last_error = _describe(failure)
        self._cancel_timers()
        self._drop_watch()
        if self.lease_id is not None:
            self._abandoned_leases.append(self.lease_id)
            self.lease_id = None
            self._lease_ttl = None
        if failure.check(LeaseNotFound) and step != "register":
            self.log.warn("etcd lost our lease ({error}); registering with a new one", error=self.last_error)
            self._connect()
            return None
        delay = self._backoff.next_delay()
        if failure.check(EtcdError):
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

    def _connect(self):
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
    def _register(self, generation):
        self._check(generation)
        config = yield self._etcd.get_prefix(self.config_prefix)
        self._check(generation)
        self._apply_config_snapshot(config)
        yield self._bootstrap_secret()
        self._check(generation)
        ttl = lease_ttl_for(self.heartbeat_interval)
        self.lease_id = yield self._etcd.grant_lease(ttl)
        self._lease_ttl = ttl
        self._check(generation)
        yield self._put_record("running")
        self._check(generation)
        watch = self._etcd.watch_prefix(
            self.config_prefix, lambda key, value: self._config_changed(generation, key, value)
        )
        self._watch = watch
        watch.done.addErrback(self._watch_broke, watch, generation)
        yield watch.started
        self._check(generation)
        if watch.done.called:
            raise EtcdError("the config watch ended as it started")

    def _registered_ok(self, _, generation):
        if generation != self._generation or self._stopping:
            return
        self.registered = True
        self.last_error = None
        self._backoff.reset()
        self.log.info(
            "registered {key} under lease {lease_id:x} (TTL {ttl}s)",
            key=self.record_key.decode("utf-8"),
            lease_id=self.lease_id,
            ttl=self._lease_ttl,
        )
        self._schedule_heartbeat(self.heartbeat_interval)
        if lease_ttl_for(self.heartbeat_interval) != self._lease_ttl:
            # The interval changed while registering: the lease must follow.
            self._switch_lease()
        if self._abandoned_leases:
            self._serialized(self._revoke_abandoned).addErrback(self._bug)
        if self._refresh_wanted:
            # Something changed after the registration had put its record.
            self.refresh_now()

    @inlineCallbacks
    def _revoke_abandoned(self):
        # Leases of failed registrations: the record moved to the new lease, so revoking
        # them early only saves etcd the wait.
        leases, self._abandoned_leases = self._abandoned_leases, []
        for lease_id in leases:
            try:
                yield self._etcd.revoke_lease(lease_id)
            except EtcdError as error:
                self.log.debug("could not revoke old lease {lease_id:x}: {error}", lease_id=lease_id, error=error)

    def _watch_broke(self, failure, watch, generation):
        if watch is not self._watch or not self.registered:
            return None  # a registration in progress sees it itself
        self.log.warn("the config watch broke: {error}", error=_describe(failure))
        return self._failed(failure, generation, "config watch")

    # -- heartbeat -------------------------------------------------------------------

    def _schedule_heartbeat(self, delay):
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = self._reactor.callLater(delay, self._heartbeat)
        self._heartbeat_due = self._reactor.seconds() + delay

    def _heartbeat(self):
        self._heartbeat_call = None
        generation = self._generation
        d = self._serialized(self._beat, generation)
        d.addCallbacks(self._beat_ok, self._failed, callbackArgs=(generation,), errbackArgs=(generation, "heartbeat"))
        d.addErrback(self._bug)

    @inlineCallbacks
    def _beat(self, generation):
        """
        Keep the lease alive: that is the short refresh, every interval. The record itself
        is written only when it changed, or every ``FULL_RECORD_EVERY`` seconds.
        """
        self._check(generation)
        yield self._etcd.keep_alive(self.lease_id)
        self._note_heartbeat_delay()
        self.last_heartbeat_at = self._reactor.seconds()
        self._check(generation)
        record = self._current_record("running")
        if record != self._written_record or self._reactor.seconds() - self._written_at >= FULL_RECORD_EVERY:
            yield self._put(record)

    def _note_heartbeat_delay(self):
        if self._heartbeat_due is None:
            return
        self.heartbeat_delay = max(0.0, self._reactor.seconds() - self._heartbeat_due)
        self.heartbeat_delay_max = max(self.heartbeat_delay_max, self.heartbeat_delay)

    def _beat_ok(self, _, generation):
        if generation != self._generation or self._stopping:
            return
        if self._heartbeat_call is None:
            self._schedule_heartbeat(self.heartbeat_interval)

    @inlineCallbacks
    def _refresh(self, generation):
        self._check(generation)
        yield self._put_record("running")

    def _current_record(self, status):
        record = dict(self._record_source())
        record.pop("heartbeat_at", None)
        if status != "running" or "status" not in record:
            record["status"] = status
        return record

    def _put_record(self, status):
        return self._put(self._current_record(status))

    @inlineCallbacks
    def _put(self, record):
        now = self._reactor.seconds()
        body = json.dumps(dict(record, heartbeat_at=now), sort_keys=True).encode("utf-8")
        self._written_record = None
        yield self._etcd.put(self.record_key, body, lease_id=self.lease_id)
        self._written_record = record
        self._written_at = self.last_heartbeat_at = now

    # -- lease TTL changes -----------------------------------------------------------

    def _switch_lease(self):
        generation = self._generation
        d = self._serialized(self._replace_lease, generation)
        d.addErrback(self._failed, generation, "lease change")
        d.addErrback(self._bug)

    @inlineCallbacks
    def _replace_lease(self, generation):
        """A lease's TTL cannot change: move the record to a new lease, revoke the old."""
        self._check(generation)
        ttl = lease_ttl_for(self.heartbeat_interval)
        if ttl == self._lease_ttl:
            return
        new_lease = yield self._etcd.grant_lease(ttl)
        old_lease = self.lease_id
        if old_lease is not None:
            self._abandoned_leases.append(old_lease)
        self.lease_id, self._lease_ttl = new_lease, ttl
        self._check(generation)
        yield self._put_record("running")
        if old_lease is not None:
            yield self._etcd.revoke_lease(old_lease)
            if old_lease in self._abandoned_leases:
                self._abandoned_leases.remove(old_lease)
        self.log.info("moved the record to lease {lease_id:x} (TTL {ttl}s)", lease_id=new_lease, ttl=ttl)

    # -- secret ----------------------------------------------------------------------

    def _cached_secret(self):
        path = self._secret_cache_path
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as cache:
                text = cache.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            self.log.warn("cannot read the secret cache {path}: {error}", path=path, error=error)
            return None
        if not is_valid_secret(text):
            self.log.warn("ignoring the invalid secret cache {path}", path=path)
            return None
        return text

    @inlineCallbacks
    def _bootstrap_secret(self):
        """
        Offer the secret known so far (or a new one) with create-if-absent; the value etcd
        keeps is the namespace's secret.
        """
        if self._secret_from_file:
            return
        offered = self.secret or self._cached_secret() or secrets.token_hex(32)
        stored = yield self._etcd.put_if_absent(self.secret_key, offered.encode("ascii"))
        text = stored.decode("utf-8", "replace")
        if not is_valid_secret(text):
            raise InvalidSecret(
                "the secret at {} is not hex of at least 64 digits; not adopting it".format(
                    self.secret_key.decode("utf-8")
                )
            )
        if stored == offered.encode("ascii") and offered != self.secret:
            self.log.info("offered the namespace secret at {key}", key=self.secret_key.decode())
        self._adopt_secret(text)

    def _adopt_secret(self, text):
        if text != self.secret:
            self.log.info("adopted the namespace secret from {key}", key=self.secret_key.decode("utf-8"))
            self.secret = text
            for listener in list(self._secret_listeners):
                try:
                    listener(text)
                except Exception:
                    self.log.failure("secret listener {listener!r} failed", listener=listener)
        path = self._secret_cache_path
        if path is not None and self._cached_secret() != text:
            try:
                write_secret_cache(path, text)
            except OSError as error:
                self.log.error("cannot write the secret cache {path}: {error}", path=path, error=error)

    def _secret_changed(self, generation, value):
        if self._secret_from_file:
            return
        if value is None:
            self.log.warn("the namespace secret was deleted from etcd; writing it back")
            d = self._serialized(self._restore_secret, generation)
            d.addErrback(self._failed, generation, "secret restore")
            d.addErrback(self._bug)
            return
        text = value.decode("utf-8", "replace")
        if not is_valid_secret(text):
            self.log.error(
                "the secret at {key} is not hex of at least 64 digits; keeping the previous one",
                key=self.secret_key.decode("utf-8"),
            )
            return
        self._adopt_secret(text)

    @inlineCallbacks
    def _restore_secret(self, generation):
        self._check(generation)
        yield self._bootstrap_secret()

    # -- config ----------------------------------------------------------------------

    def _config_name(self, key):
        return key[len(self.config_prefix) :].decode("utf-8", "replace")

    def _config_changed(self, generation, key, value):
        if generation != self._generation or self._stopping:
            return
        name = self._config_name(key)
        if name == SECRET_NAME:
            self._secret_changed(generation, value)
        elif value is None:
            self._remove_config(name)
        else:
            self._apply_config_value(name, value)

    def _apply_config_snapshot(self, values):
        seen = set()
        for key, raw in sorted(values.items()):
            name = self._config_name(key)
            if name == SECRET_NAME:
                continue
            seen.add(name)
            self._apply_config_value(name, raw)
        for name in list(self.cluster_config):
            if name not in seen:
                self._remove_config(name)

    def _apply_config_value(self, name, raw):
        try:
            value = parse_config_value(name, raw)
        except ValueError as error:
            self.log.error(
                "ignoring invalid cluster config {key} = {raw!r}: {error}",
                key=(self.config_prefix + name.encode("utf-8")).decode("utf-8"),
                raw=raw,
                error=error,
            )
            return
        if self.cluster_config.get(name, _MISSING) == value:
            return
        self.cluster_config[name] = value
        self.log.info("cluster config {name} = {value!r}", name=name, value=value)
        if name == "heartbeat_interval":
            self._set_heartbeat_interval(value)
        self._notify_listeners(name, value)

    def _remove_config(self, name):
        if self.cluster_config.pop(name, _MISSING) is _MISSING:
            return
        self.log.info("cluster config {name} removed", name=name)
        if name == "heartbeat_interval":
            self._set_heartbeat_interval(self._default_interval)
        self._notify_listeners(name, None)

    def _notify_listeners(self, name, value):
        for listener in list(self._config_listeners):
            try:
                listener(name, value)
            except Exception:
                self.log.failure("config listener {listener!r} failed on {name}", listener=listener, name=name)

    def _set_heartbeat_interval(self, interval):
        if interval == self.heartbeat_interval:
            return
        self.log.info("heartbeat interval {old}s -> {new}s", old=self.heartbeat_interval, new=interval)
        self.heartbeat_interval = interval
        if not self.registered or self._stopping:
            return  # registration picks it up
        self._schedule_heartbeat(interval)
        if lease_ttl_for(interval) != self._lease_ttl:
            self._switch_lease()
