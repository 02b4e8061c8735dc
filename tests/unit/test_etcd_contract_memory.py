"""The IEtcd contract, run against MemoryEtcd, plus what only the fake promises."""

import pytest
from twisted.internet.task import Clock

from bai_agent.etcd.interface import EtcdError, EtcdUnavailable, LeaseNotFound
from bai_agent.testing.deferreds import error_of, result_of
from bai_agent.testing.etcd_contract import EtcdContractTests, assert_now
from bai_agent.testing.memory_etcd import MemoryEtcd


class TestMemoryEtcdContract(EtcdContractTests):
    @pytest.fixture
    def etcd(self):
        return MemoryEtcd(Clock())

    @pytest.fixture
    def eventually(self):
        return assert_now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def etcd(clock):
    return MemoryEtcd(clock)


def test_lease_expires_after_ttl_and_watchers_see_deletion(clock, etcd):
    seen = []
    etcd.watch_prefix(b"/a/", lambda key, value: seen.append((key, value)))
    lease_id = result_of(etcd.grant_lease(10))
    result_of(etcd.put(b"/a/k", b"v", lease_id=lease_id))
    clock.advance(9.9)
    assert result_of(etcd.get(b"/a/k")) == b"v"
    clock.advance(0.2)
    assert result_of(etcd.get(b"/a/k")) is None
    assert seen == [(b"/a/k", b"v"), (b"/a/k", None)]
    with pytest.raises(LeaseNotFound):
        result_of(etcd.keep_alive(lease_id))


def test_keep_alive_postpones_expiry(clock, etcd):
    lease_id = result_of(etcd.grant_lease(10))
    result_of(etcd.put(b"/k", b"v", lease_id=lease_id))
    for _ in range(5):
        clock.advance(8)
        assert result_of(etcd.keep_alive(lease_id)) == 10
    assert result_of(etcd.get(b"/k")) == b"v"
    assert etcd.lease_remaining(lease_id) == 10


def test_put_without_lease_detaches_key_from_lease(clock, etcd):
    lease_id = result_of(etcd.grant_lease(10))
    result_of(etcd.put(b"/k", b"v", lease_id=lease_id))
    result_of(etcd.put(b"/k", b"w"))
    clock.advance(11)
    assert result_of(etcd.get(b"/k")) == b"w"
    assert etcd.lease_of(b"/k") is None


def test_outage_fails_calls_and_open_watches(etcd):
    watch = etcd.watch_prefix(b"/", lambda key, value: None)
    etcd.set_available(False)
    with pytest.raises(EtcdUnavailable):
        result_of(watch.done)
    with pytest.raises(EtcdUnavailable):
        result_of(etcd.get(b"/k"))
    with pytest.raises(EtcdUnavailable):
        result_of(etcd.put(b"/k", b"v"))
    with pytest.raises(EtcdUnavailable):
        result_of(etcd.grant_lease(10))
    etcd.set_available(True)
    result_of(etcd.put(b"/k", b"v"))
    assert result_of(etcd.get(b"/k")) == b"v"


def test_leases_keep_ageing_during_outage(clock, etcd):
    lease_id = result_of(etcd.grant_lease(10))
    result_of(etcd.put(b"/k", b"v", lease_id=lease_id))
    etcd.set_available(False)
    clock.advance(11)
    etcd.set_available(True)
    assert result_of(etcd.get(b"/k")) is None
    with pytest.raises(LeaseNotFound):
        result_of(etcd.keep_alive(lease_id))


def test_watch_from_start_revision_replays_history(etcd):
    result_of(etcd.put(b"/a/1", b"x"))
    revision = etcd.revision
    result_of(etcd.put(b"/a/2", b"y"))
    result_of(etcd.delete(b"/a/1"))
    seen = []
    etcd.watch_prefix(b"/a/", lambda key, value: seen.append((key, value)), start_revision=revision + 1)
    assert seen == [(b"/a/2", b"y"), (b"/a/1", None)]


def test_break_watches_fails_done_but_etcd_stays_up(etcd):
    watch = etcd.watch_prefix(b"/", lambda key, value: None)
    etcd.break_watches()
    # Failed, with etcd's error: not merely unfired (result_of's AssertionError).
    error_of(watch.done, EtcdError)
    assert etcd.open_watches == 0
    result_of(etcd.put(b"/k", b"v"))
