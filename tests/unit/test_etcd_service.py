"""EtcdService on task.Clock and MemoryEtcd."""

import json
import os
import stat

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from bai_agent.etcd.registration import lease_ttl_for
from bai_agent.etcd.service import EtcdService
from bai_agent.protocol.auth import is_valid_secret
from bai_agent.testing.deferreds import result_of
from bai_agent.testing.memory_etcd import MemoryEtcd

NAMESPACE = "ns"
AGENT_ID = "agent-1"
RECORD_KEY = b"/bai/ns/agents/agent-1"
SECRET_KEY = b"/bai/ns/config/agent/secret"
CONFIG = b"/bai/ns/config/agent/"
VALID_SECRET = "ab" * 32


class CountingEtcd(MemoryEtcd):
    """MemoryEtcd that counts registration attempts (each starts with a config read)."""

    def __init__(self, clock):
        MemoryEtcd.__init__(self, clock)
        self.config_reads = 0

    keep_alive_delay = 0.0

    def get_prefix(self, prefix):
        if prefix == CONFIG:
            self.config_reads += 1
        return MemoryEtcd.get_prefix(self, prefix)

    def keep_alive(self, lease_id):
        if not self.keep_alive_delay:
            return MemoryEtcd.keep_alive(self, lease_id)
        return deferLater(self.clock, self.keep_alive_delay, MemoryEtcd.keep_alive, self, lease_id)


class HangingEtcd(MemoryEtcd):
    """MemoryEtcd whose puts never answer while ``hang`` is set (cancellable)."""

    hang = False

    def __init__(self, clock):
        MemoryEtcd.__init__(self, clock)
        self.cancelled = 0

    def put(self, key, value, lease_id=None):
        if self.hang:

            def cancelled(_):
                self.cancelled += 1

            return Deferred(cancelled)
        return MemoryEtcd.put(self, key, value, lease_id)


class SlowWatchEtcd(MemoryEtcd):
    """MemoryEtcd whose watches start only when the test says so."""

    def __init__(self, clock):
        MemoryEtcd.__init__(self, clock)
        self.starting = []

    def watch_prefix(self, prefix, on_change, start_revision=None):
        watch = MemoryEtcd.watch_prefix(self, prefix, on_change, start_revision)
        watch.started = Deferred()
        self.starting.append(watch.started)
        return watch


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def etcd(clock):
    return CountingEtcd(clock)


@pytest.fixture
def record():
    return {"agent_id": AGENT_ID, "version": "0.1.0", "protocol": 1, "kernels": 0}


@pytest.fixture
def make_service(clock, etcd, record, tmp_path):
    services = []

    def make(etcd=etcd, **kwargs):
        kwargs.setdefault("secret_cache_path", str(tmp_path / "state" / "secret"))
        kwargs.setdefault("random", lambda: 1.0)  # the longest jitter: exact backoff bounds
        service = EtcdService(clock, etcd, NAMESPACE, kwargs.pop("agent_id", AGENT_ID), lambda: dict(record), **kwargs)
        service.setName("etcd")
        services.append(service)
        return service

    yield make
    for service in services:
        if service.running:
            service.stopService()


def stored_record(etcd, key=RECORD_KEY):
    raw = result_of(etcd.get(key))
    return json.loads(raw) if raw is not None else None


# -- registration and heartbeat ------------------------------------------------------


def test_registers_record_under_lease_with_ttl(clock, etcd, make_service):
    clock.advance(100)
    service = make_service()
    service.startService()
    assert service.registered
    assert service.last_error is None
    found = stored_record(etcd)
    assert found == {
        "agent_id": AGENT_ID,
        "version": "0.1.0",
        "protocol": 1,
        "kernels": 0,
        "status": "running",
        "heartbeat_at": 100.0,
    }
    assert etcd.lease_of(RECORD_KEY) == service.lease_id
    assert etcd.lease_ttl(service.lease_id) == 10
    assert service.last_heartbeat_at == 100.0
    assert service.health().registered


def test_lease_ttl_is_three_heartbeats_but_at_least_ten_seconds(etcd, make_service):
    assert lease_ttl_for(3.0) == 10
    assert lease_ttl_for(3.5) == 11
    service = make_service(heartbeat_interval=5.0)
    service.startService()
    assert etcd.lease_ttl(service.lease_id) == 15


def test_lease_kept_alive_every_interval_record_written_on_change(clock, etcd, make_service, record):
    service = make_service()
    service.startService()
    lease_id = service.lease_id
    clock.advance(3.0)
    # Nothing changed: the heartbeat only kept the lease alive.
    assert stored_record(etcd)["heartbeat_at"] == 0.0
    assert service.last_heartbeat_at == 3.0
    record["kernels"] = 2
    clock.advance(3.0)
    found = stored_record(etcd)
    assert found["heartbeat_at"] == 6.0
    assert found["kernels"] == 2
    for _ in range(19):  # 57 s more: far beyond the TTL, kept alive by the heartbeats
        clock.advance(3.0)
    assert service.lease_id == lease_id
    assert etcd.lease_remaining(lease_id) == 10
    assert service.last_heartbeat_at == 63.0
    assert stored_record(etcd)["heartbeat_at"] == 6.0
    clock.advance(3.0)  # 60 s after the last full write: written again, unchanged
    assert stored_record(etcd)["heartbeat_at"] == 66.0


def test_heartbeat_delay_measured_against_schedule(clock, etcd, make_service):
    service = make_service()
    service.startService()
    clock.advance(3.0)
    assert service.heartbeat_delay == 0.0
    etcd.keep_alive_delay = 0.5
    clock.advance(3.0)
    clock.advance(0.5)
    assert service.heartbeat_delay == 0.5
    etcd.keep_alive_delay = 0.0
    clock.advance(3.0)
    assert service.heartbeat_delay == 0.0
    assert service.heartbeat_delay_max == 0.5


def test_refresh_now_puts_record_at_once(clock, etcd, make_service, record):
    service = make_service()
    service.startService()
    clock.advance(1.0)
    record["kernels"] = 5
    result_of(service.refresh_now())
    found = stored_record(etcd)
    assert found["kernels"] == 5
    assert found["heartbeat_at"] == 1.0


def test_refresh_during_registration_is_put_once_registered(clock, make_service, record):
    etcd = SlowWatchEtcd(clock)
    service = make_service(etcd=etcd)
    service.startService()
    assert stored_record(etcd)["kernels"] == 0  # put, but the watch has not started yet
    assert not service.registered
    record["kernels"] = 7
    result_of(service.refresh_now())
    etcd.starting[0].callback(None)
    assert service.registered
    assert stored_record(etcd)["kernels"] == 7


def test_start_never_raises_when_etcd_is_away(etcd, make_service):
    etcd.set_available(False)
    service = make_service()
    service.startService()
    assert not service.registered
    assert "EtcdUnavailable" in service.last_error
    assert service.secret is None


def test_outage_unregisters_backs_off_and_recovers_with_new_lease(clock, etcd, make_service):
    service = make_service()
    service.startService()
    first_lease = service.lease_id
    assert etcd.config_reads == 1

    etcd.set_available(False)  # the config watch breaks at once
    assert not service.registered
    assert "EtcdUnavailable" in service.last_error
    # Backoff 0.5 s doubling to 10 s (random() == 1.0 gives the upper bound).
    for expected_delay in [0.5, 1, 2, 4, 8, 10, 10]:
        reads = etcd.config_reads
        clock.advance(expected_delay - 0.01)
        assert etcd.config_reads == reads
        clock.advance(0.01)
        assert etcd.config_reads == reads + 1
        assert not service.registered

    etcd.set_available(True)
    clock.advance(10)
    assert service.registered
    assert service.last_error is None
    assert service.lease_id != first_lease
    assert etcd.lease_of(RECORD_KEY) == service.lease_id
    assert stored_record(etcd)["status"] == "running"
    # The old lease is gone (expired during the outage, or revoked after recovery).
    assert etcd.lease_ttl(first_lease) is None


def test_backoff_restarts_small_after_a_successful_registration(clock, etcd, make_service):
    service = make_service()
    service.startService()
    etcd.set_available(False)
    clock.advance(0.5 + 1 + 2 + 4)
    etcd.set_available(True)
    clock.advance(8)
    assert service.registered
    etcd.set_available(False)
    reads = etcd.config_reads
    clock.advance(0.5)
    assert etcd.config_reads == reads + 1


def test_backoff_is_jittered_by_the_injected_random(clock, etcd, make_service):
    service = make_service(random=lambda: 0.0)  # the shortest jitter: half the delay
    service.startService()
    etcd.set_available(False)
    reads = etcd.config_reads
    clock.advance(0.25)
    assert etcd.config_reads == reads + 1
    clock.advance(0.5)
    assert etcd.config_reads == reads + 2


def test_lost_lease_re_registers_at_once_with_new_lease(clock, etcd, make_service):
    service = make_service()
    service.startService()
    first_lease = service.lease_id
    result_of(etcd.revoke_lease(first_lease))  # e.g. expired while the agent was paused
    assert stored_record(etcd) is None
    clock.advance(3.0)  # the next heartbeat finds the lease gone
    assert service.registered
    assert service.lease_id not in (None, first_lease)
    assert etcd.lease_of(RECORD_KEY) == service.lease_id
    assert stored_record(etcd)["heartbeat_at"] == 3.0


def test_record_source_failure_is_retried(clock, etcd, make_service, record):
    calls = []

    def flaky_source():
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("resources not probed yet")
        return dict(record)

    service = EtcdService(clock, etcd, NAMESPACE, AGENT_ID, flaky_source, random=lambda: 1.0)
    service.startService()
    assert not service.registered
    assert "resources not probed yet" in service.last_error
    clock.advance(0.5)
    assert service.registered
    assert stored_record(etcd)["status"] == "running"
    service.stopService()


def test_broken_watch_re_registers_after_re_reading_config(clock, etcd, make_service):
    service = make_service()
    service.startService()
    etcd.break_watches()
    assert not service.registered
    # Changed while nobody watched: the re-read must see it.
    result_of(etcd.put(CONFIG + b"idle_timeout", b"42"))
    assert "idle_timeout" not in service.cluster_config
    clock.advance(0.5)
    assert service.registered
    assert service.cluster_config["idle_timeout"] == 42
    assert etcd.open_watches == 1


# -- secret --------------------------------------------------------------------------


def test_first_agent_bootstraps_secret_and_caches_it(etcd, make_service, tmp_path):
    service = make_service()
    service.startService()
    stored = result_of(etcd.get(SECRET_KEY)).decode()
    assert is_valid_secret(stored) and len(stored) == 64
    assert service.secret == stored
    cache = tmp_path / "state" / "secret"
    assert cache.read_text().strip() == stored
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600


def test_second_agent_adopts_existing_secret(etcd, make_service, tmp_path):
    first = make_service()
    first.startService()
    second = make_service(agent_id="agent-2", secret_cache_path=str(tmp_path / "other"))
    second.startService()
    assert second.secret == first.secret
    assert (tmp_path / "other").read_text().strip() == first.secret
    assert stored_record(etcd, b"/bai/ns/agents/agent-2")["status"] == "running"


def test_known_secret_is_written_back_after_etcd_data_loss(clock, etcd, make_service):
    first = make_service()
    first.startService()
    known = first.secret
    result_of(first.stopService())

    fresh_etcd = MemoryEtcd(clock)  # etcd lost its data
    again = make_service(etcd=fresh_etcd)  # same cache path
    again.startService()
    assert result_of(fresh_etcd.get(SECRET_KEY)) == known.encode()
    assert again.secret == known


def test_secret_deleted_from_etcd_is_written_back(etcd, make_service):
    service = make_service()
    service.startService()
    known = service.secret
    result_of(etcd.delete(SECRET_KEY))
    assert result_of(etcd.get(SECRET_KEY)) == known.encode()
    assert service.registered


def test_secret_changed_by_operator_is_adopted(etcd, make_service, tmp_path):
    service = make_service()
    service.startService()
    new_secret = "cd" * 40
    result_of(etcd.put(SECRET_KEY, new_secret.encode()))
    assert service.secret == new_secret
    assert (tmp_path / "state" / "secret").read_text().strip() == new_secret
    result_of(etcd.put(SECRET_KEY, b"short"))
    assert service.secret == new_secret


def test_secret_file_overrides_and_etcd_key_is_never_written(etcd, make_service, tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("  " + VALID_SECRET + "\n")
    service = make_service(secret_file=str(secret_file))
    assert service.secret == VALID_SECRET
    service.startService()
    assert service.registered
    assert result_of(etcd.get(SECRET_KEY)) is None
    result_of(etcd.put(SECRET_KEY, ("ef" * 32).encode()))
    assert service.secret == VALID_SECRET


@pytest.mark.parametrize("content", ["", "abc123", "zz" * 40, "ab" * 31 + "a"])
def test_invalid_secret_file_is_rejected_at_construction(etcd, make_service, tmp_path, content):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(content)
    with pytest.raises(ValueError, match="secret.txt"):
        make_service(secret_file=str(secret_file))


def test_missing_secret_file_is_rejected_at_construction(make_service, tmp_path):
    with pytest.raises(ValueError, match="nonexistent"):
        make_service(secret_file=str(tmp_path / "nonexistent"))


def test_invalid_secret_in_etcd_is_not_adopted_and_retried(clock, etcd, make_service):
    result_of(etcd.put(SECRET_KEY, b"not-a-hex-secret"))
    service = make_service()
    service.startService()
    assert service.secret is None
    assert not service.registered
    assert "secret" in service.last_error
    assert result_of(etcd.get(SECRET_KEY)) == b"not-a-hex-secret"
    result_of(etcd.put(SECRET_KEY, VALID_SECRET.encode()))  # the operator repairs it
    clock.advance(0.5)
    assert service.secret == VALID_SECRET
    assert service.registered


def test_invalid_cached_secret_is_not_offered(etcd, make_service, tmp_path):
    cache = tmp_path / "state" / "secret"
    cache.parent.mkdir()
    cache.write_text("garbage")
    service = make_service()
    service.startService()
    assert is_valid_secret(service.secret)
    assert cache.read_text().strip() == service.secret


# -- config --------------------------------------------------------------------------


def test_config_read_at_start_validated_and_bad_values_ignored(etcd, make_service):
    result_of(etcd.put(CONFIG + b"idle_timeout", b"600"))
    result_of(etcd.put(CONFIG + b"exec_timeout", b"-1"))
    result_of(etcd.put(CONFIG + b"heartbeat_interval", b"fast"))
    result_of(etcd.put(CONFIG + b"docker_network", b"none"))
    service = make_service()
    service.startService()
    assert service.registered
    assert service.cluster_config == {"idle_timeout": 600, "docker_network": "none"}
    assert service.heartbeat_interval == 3.0


@pytest.mark.parametrize("raw", [b"99999999999999999999", b"31536001", b"1e9", b"true", b"-0x1"])
def test_timeouts_out_of_the_managers_range_are_ignored(etcd, make_service, raw):
    # A huge exec_timeout once made every Execute fail and left kernels on RUN_CONFLICT.
    result_of(etcd.put(CONFIG + b"exec_timeout", raw))
    result_of(etcd.put(CONFIG + b"idle_timeout", raw))
    service = make_service()
    service.startService()
    assert service.cluster_config == {}


@pytest.mark.parametrize("raw", [b"0.1", b"301", b"nan", b"inf", b"x"])
def test_out_of_range_heartbeat_interval_is_ignored(etcd, make_service, raw):
    service = make_service()
    service.startService()
    result_of(etcd.put(CONFIG + b"heartbeat_interval", raw))
    assert service.heartbeat_interval == 3.0
    assert "heartbeat_interval" not in service.cluster_config


def test_live_invalid_value_keeps_previous_and_listeners_see_valid_changes(etcd, make_service):
    service = make_service()
    changes = []
    service.add_config_listener(lambda name, value: changes.append((name, value)))
    service.startService()
    result_of(etcd.put(CONFIG + b"idle_timeout", b"60"))
    result_of(etcd.put(CONFIG + b"idle_timeout", b"sixty"))
    assert service.cluster_config["idle_timeout"] == 60
    result_of(etcd.put(CONFIG + b"exec_timeout", b"0"))
    result_of(etcd.delete(CONFIG + b"idle_timeout"))
    assert service.cluster_config == {"exec_timeout": 0}
    assert changes == [("idle_timeout", 60), ("exec_timeout", 0), ("idle_timeout", None)]


def test_failing_config_listener_does_not_stop_others(etcd, make_service):
    service = make_service()
    seen = []

    def broken(name, value):
        raise RuntimeError("listener bug")

    service.add_config_listener(broken)
    service.add_config_listener(lambda name, value: seen.append(name))
    service.startService()
    result_of(etcd.put(CONFIG + b"idle_timeout", b"5"))
    assert seen == ["idle_timeout"]
    assert service.registered


def test_heartbeat_interval_change_applies_live(clock, etcd, make_service):
    service = make_service()
    service.startService()
    old_lease = service.lease_id
    assert etcd.lease_ttl(old_lease) == 10

    clock.advance(1.0)
    result_of(etcd.put(CONFIG + b"heartbeat_interval", b"6"))
    assert service.heartbeat_interval == 6.0
    assert service.cluster_config["heartbeat_interval"] == 6.0
    new_lease = service.lease_id
    assert new_lease != old_lease
    assert etcd.lease_ttl(new_lease) == 18
    assert etcd.lease_of(RECORD_KEY) == new_lease
    assert etcd.lease_ttl(old_lease) is None  # revoked
    assert stored_record(etcd)["heartbeat_at"] == 1.0

    clock.advance(5.9)  # the old 3 s schedule no longer applies
    assert service.last_heartbeat_at == 1.0
    clock.advance(0.1)
    assert service.last_heartbeat_at == 7.0
    clock.advance(6.0)
    assert service.last_heartbeat_at == 13.0

    result_of(etcd.delete(CONFIG + b"heartbeat_interval"))  # back to the agent's own
    assert service.heartbeat_interval == 3.0
    assert etcd.lease_ttl(service.lease_id) == 10


def test_heartbeat_interval_from_config_sets_initial_ttl(etcd, make_service):
    result_of(etcd.put(CONFIG + b"heartbeat_interval", b"10"))
    service = make_service()
    service.startService()
    assert service.heartbeat_interval == 10.0
    assert etcd.lease_ttl(service.lease_id) == 30


def test_small_interval_change_keeps_the_lease(clock, etcd, make_service):
    service = make_service()
    service.startService()
    lease_id = service.lease_id
    result_of(etcd.put(CONFIG + b"heartbeat_interval", b"2"))  # TTL stays 10
    assert service.lease_id == lease_id
    clock.advance(2.0)
    assert service.last_heartbeat_at == 2.0


# -- stop ----------------------------------------------------------------------------


def test_stop_marks_stopping_revokes_lease_and_leaves_no_timers(clock, etcd, make_service):
    service = make_service()
    service.startService()
    clock.advance(4.0)
    seen = []
    etcd.watch_prefix(b"/bai/ns/agents/", lambda key, value: seen.append(value))
    result_of(service.stopService())
    assert json.loads(seen[0])["status"] == "stopping"
    assert seen[1:] == [None]
    assert stored_record(etcd) is None
    assert etcd.lease_ids == set()
    assert not service.registered
    assert service.lease_id is None
    assert clock.getDelayedCalls() == []
    assert etcd.open_watches == 1  # only the test's own watch


def test_stop_while_etcd_away_returns_at_once(clock, etcd, make_service):
    service = make_service()
    service.startService()
    etcd.set_available(False)
    result_of(service.stopService())
    # Only the server's lease expiry is left; the record goes when it fires.
    assert len(clock.getDelayedCalls()) == len(etcd.lease_ids) == 1
    clock.advance(10)
    assert clock.getDelayedCalls() == []
    etcd.set_available(True)
    assert stored_record(etcd) is None


def test_stop_waits_for_in_flight_work_but_at_most_two_seconds(clock, make_service):
    etcd = HangingEtcd(clock)
    service = make_service(etcd=etcd)
    service.startService()
    etcd.hang = True
    clock.advance(3.0)  # a heartbeat is now stuck in put
    stopped = service.stopService()
    assert not stopped.called
    clock.advance(1.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called
    assert etcd.cancelled >= 1  # the stuck put was given up
    # What is left on the clock is the server's lease expiry, none of the service's timers.
    assert len(clock.getDelayedCalls()) == len(etcd.lease_ids) == 1
    etcd.hang = False
    clock.advance(30)
    assert clock.getDelayedCalls() == []


def test_restart_after_stop_registers_again(clock, etcd, make_service):
    service = make_service()
    service.startService()
    result_of(service.stopService())
    service.startService()
    assert service.registered
    assert stored_record(etcd)["status"] == "running"
