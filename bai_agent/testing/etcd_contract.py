"""
The ``IEtcd`` contract: one test suite that every implementation must pass.

Mix ``EtcdContractTests`` into a pytest test class that provides two fixtures:

- ``etcd``: the ``IEtcd`` under test (its keys may be shared with other tests: every test
  works under its own ``keyspace`` prefix);
- ``eventually``: a callable ``eventually(predicate)`` returning a Deferred that fires once
  ``predicate()`` is true, failing if it does not become true in reasonable time. A
  synchronous fake checks at once (``assert_now``); a real server polls
  (``poll_until``).

Tests are ``pytest_twisted.inlineCallbacks`` methods, so they run against real servers on
the reactor and against synchronous fakes alike.
"""

import uuid

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from bai_agent.etcd.interface import IEtcd, IWatch, LeaseNotFound

LEASE_TTL = 30


def assert_now(predicate):
    """``eventually`` for synchronous implementations: the condition must hold already."""
    assert predicate(), "condition not met synchronously"
    return succeed(None)


@inlineCallbacks
def poll_until(reactor, predicate, timeout=5.0, interval=0.01):
    """``eventually`` for real implementations: poll ``predicate`` on ``reactor``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield deferLater(reactor, interval, lambda: None)


class EtcdContractTests:
    """The behaviour every ``IEtcd`` shares. Subclasses supply ``etcd`` and ``eventually``."""

    @pytest.fixture
    def keyspace(self):
        return b"/contract/" + uuid.uuid4().hex.encode("ascii") + b"/"

    def test_provides_interface(self, etcd):
        assert verifyObject(IEtcd, etcd)

    @pytest_twisted.inlineCallbacks
    def test_get_of_missing_key_is_none(self, etcd, keyspace):
        assert (yield etcd.get(keyspace + b"missing")) is None

    @pytest_twisted.inlineCallbacks
    def test_put_then_get_returns_value(self, etcd, keyspace):
        yield etcd.put(keyspace + b"k", b"v1")
        assert (yield etcd.get(keyspace + b"k")) == b"v1"
        yield etcd.put(keyspace + b"k", b"v2")
        assert (yield etcd.get(keyspace + b"k")) == b"v2"

    @pytest_twisted.inlineCallbacks
    def test_empty_value_round_trips_as_empty_bytes(self, etcd, keyspace):
        yield etcd.put(keyspace + b"empty", b"")
        assert (yield etcd.get(keyspace + b"empty")) == b""

    @pytest_twisted.inlineCallbacks
    def test_binary_value_round_trips(self, etcd, keyspace):
        value = bytes(range(256))
        yield etcd.put(keyspace + b"bin", value)
        assert (yield etcd.get(keyspace + b"bin")) == value

    @pytest_twisted.inlineCallbacks
    def test_get_prefix_returns_exactly_the_keys_under_prefix(self, etcd, keyspace):
        yield etcd.put(keyspace + b"dir/a", b"1")
        yield etcd.put(keyspace + b"dir/b", b"2")
        yield etcd.put(keyspace + b"dir/sub/c", b"")
        yield etcd.put(keyspace + b"dirx", b"outside")
        yield etcd.put(keyspace + b"other/a", b"outside")
        found = yield etcd.get_prefix(keyspace + b"dir/")
        assert found == {
            keyspace + b"dir/a": b"1",
            keyspace + b"dir/b": b"2",
            keyspace + b"dir/sub/c": b"",
        }
        assert (yield etcd.get_prefix(keyspace + b"nothing/")) == {}

    @pytest_twisted.inlineCallbacks
    def test_put_if_absent_creates_once_then_returns_existing(self, etcd, keyspace):
        key = keyspace + b"secret"
        assert (yield etcd.put_if_absent(key, b"first")) == b"first"
        assert (yield etcd.put_if_absent(key, b"second")) == b"first"
        assert (yield etcd.get(key)) == b"first"

    @pytest_twisted.inlineCallbacks
    def test_put_if_absent_does_not_replace_a_put_value(self, etcd, keyspace):
        key = keyspace + b"operator"
        yield etcd.put(key, b"set-by-operator")
        assert (yield etcd.put_if_absent(key, b"mine")) == b"set-by-operator"

    @pytest_twisted.inlineCallbacks
    def test_delete_removes_key_and_counts_deleted(self, etcd, keyspace):
        key = keyspace + b"doomed"
        yield etcd.put(key, b"v")
        assert (yield etcd.delete(key)) == 1
        assert (yield etcd.get(key)) is None
        assert (yield etcd.delete(key)) == 0

    @pytest_twisted.inlineCallbacks
    def test_put_if_absent_creates_again_after_delete(self, etcd, keyspace):
        key = keyspace + b"again"
        yield etcd.put_if_absent(key, b"one")
        yield etcd.delete(key)
        assert (yield etcd.put_if_absent(key, b"two")) == b"two"

    @pytest_twisted.inlineCallbacks
    def test_revoking_lease_deletes_its_keys(self, etcd, keyspace):
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        assert isinstance(lease_id, int)
        yield etcd.put(keyspace + b"leased", b"v", lease_id=lease_id)
        yield etcd.put(keyspace + b"kept", b"v")
        assert (yield etcd.get(keyspace + b"leased")) == b"v"
        yield etcd.revoke_lease(lease_id)
        assert (yield etcd.get(keyspace + b"leased")) is None
        assert (yield etcd.get(keyspace + b"kept")) == b"v"

    @pytest_twisted.inlineCallbacks
    def test_keep_alive_answers_the_ttl(self, etcd):
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        ttl = yield etcd.keep_alive(lease_id)
        assert 0 < ttl <= LEASE_TTL
        yield etcd.revoke_lease(lease_id)

    @pytest_twisted.inlineCallbacks
    def test_keep_alive_on_revoked_lease_fails_with_lease_not_found(self, etcd):
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        yield etcd.revoke_lease(lease_id)
        with pytest.raises(LeaseNotFound):
            yield etcd.keep_alive(lease_id)

    @pytest_twisted.inlineCallbacks
    def test_put_on_revoked_lease_fails_with_lease_not_found(self, etcd, keyspace):
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        yield etcd.revoke_lease(lease_id)
        with pytest.raises(LeaseNotFound):
            yield etcd.put(keyspace + b"k", b"v", lease_id=lease_id)
        assert (yield etcd.get(keyspace + b"k")) is None

    @pytest_twisted.inlineCallbacks
    def test_revoking_a_revoked_lease_is_not_an_error(self, etcd):
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        yield etcd.revoke_lease(lease_id)
        assert (yield etcd.revoke_lease(lease_id)) is None

    @pytest_twisted.inlineCallbacks
    def test_watch_prefix_sees_put_and_delete_in_order(self, etcd, eventually, keyspace):
        seen = []
        watch = etcd.watch_prefix(keyspace + b"w/", lambda key, value: seen.append((key, value)))
        assert verifyObject(IWatch, watch)
        yield watch.started
        yield etcd.put(keyspace + b"elsewhere", b"ignored")
        yield etcd.put(keyspace + b"w/a", b"1")
        yield etcd.put(keyspace + b"w/a", b"")
        yield etcd.delete(keyspace + b"w/a")
        yield eventually(lambda: len(seen) >= 3)
        assert seen == [
            (keyspace + b"w/a", b"1"),
            (keyspace + b"w/a", b""),
            (keyspace + b"w/a", None),
        ]
        watch.cancel()
        yield watch.done

    @pytest_twisted.inlineCallbacks
    def test_watch_sees_deletion_of_leased_key_on_revoke(self, etcd, eventually, keyspace):
        seen = []
        watch = etcd.watch_prefix(keyspace, lambda key, value: seen.append((key, value)))
        yield watch.started
        lease_id = yield etcd.grant_lease(LEASE_TTL)
        yield etcd.put(keyspace + b"leased", b"v", lease_id=lease_id)
        yield etcd.revoke_lease(lease_id)
        yield eventually(lambda: len(seen) >= 2)
        assert seen == [(keyspace + b"leased", b"v"), (keyspace + b"leased", None)]
        watch.cancel()

    @pytest_twisted.inlineCallbacks
    def test_cancel_fires_done_and_stops_callbacks(self, etcd, eventually, keyspace):
        cancelled_seen = []
        witness_seen = []
        watch = etcd.watch_prefix(keyspace, lambda key, value: cancelled_seen.append(key))
        witness = etcd.watch_prefix(keyspace, lambda key, value: witness_seen.append(key))
        yield watch.started
        yield witness.started
        watch.cancel()
        assert (yield watch.done) is None
        yield etcd.put(keyspace + b"after", b"v")
        # Once the witness has seen the change, the cancelled watch would have too.
        yield eventually(lambda: witness_seen == [keyspace + b"after"])
        assert cancelled_seen == []
        watch.cancel()  # a second cancel is harmless
        witness.cancel()
        assert (yield witness.done) is None

    @pytest_twisted.inlineCallbacks
    def test_watch_callback_exception_does_not_break_the_watch(self, etcd, eventually, keyspace):
        seen = []

        def on_change(key, value):
            seen.append(key)
            if len(seen) == 1:
                raise RuntimeError("a buggy listener")

        watch = etcd.watch_prefix(keyspace, on_change)
        yield watch.started
        yield etcd.put(keyspace + b"1", b"v")
        yield etcd.put(keyspace + b"2", b"v")
        yield eventually(lambda: len(seen) >= 2)
        assert seen == [keyspace + b"1", keyspace + b"2"]
        assert not watch.done.called
        watch.cancel()

    def test_non_bytes_key_is_a_type_error(self, etcd):
        with pytest.raises(TypeError):
            etcd.get("text-key")
        with pytest.raises(TypeError):
            etcd.put(b"/k", "text-value")
