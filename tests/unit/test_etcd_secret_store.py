"""SecretStore: the secret cache is read and written through run_blocking, never inline."""

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from bai_agent.etcd.secret_store import SecretStore, read_secret_cache, sync_secret_cache
from bai_agent.protocol.keys import secret_key
from bai_agent.testing.memory_etcd import MemoryEtcd

SECRET = "ab" * 32


class HeldBlocking:
    """A run_blocking that runs nothing until the test releases it, as a thread pool would later."""

    def __init__(self):
        self.calls = []

    def __call__(self, function, *args):
        d = Deferred()
        self.calls.append((function, args, d))
        return d

    def release(self):
        function, args, d = self.calls.pop(0)
        maybeDeferred(function, *args).chainDeferred(d)


def test_cache_is_read_and_written_only_through_run_blocking(tmp_path):
    cache = tmp_path / "state" / "secret"
    cache.parent.mkdir()
    cache.write_text(SECRET + "\n")
    etcd = MemoryEtcd(Clock())
    blocking = HeldBlocking()
    store = SecretStore(etcd, secret_key("ns"), cache_path=str(cache), run_blocking=blocking)
    done = store.bootstrap()
    assert [function for function, _, _ in blocking.calls] == [read_secret_cache]
    assert not done.called
    blocking.release()
    assert store.secret == SECRET  # the cached one was offered, and etcd kept it
    assert [function for function, _, _ in blocking.calls] == [sync_secret_cache]
    assert not done.called
    blocking.release()
    assert done.called
    assert cache.read_text() == SECRET + "\n"


def test_rotations_reach_the_cache_in_order(tmp_path):
    cache = tmp_path / "secret"
    etcd = MemoryEtcd(Clock())
    blocking = HeldBlocking()
    store = SecretStore(etcd, secret_key("ns"), cache_path=str(cache), run_blocking=blocking)
    first, second = "cd" * 32, "ef" * 32
    assert store.changed(first.encode())
    assert store.changed(second.encode())
    assert store.secret == second
    assert len(store.in_flight) == 2
    assert len(blocking.calls) == 1  # the second write waits for the first
    blocking.release()
    blocking.release()
    assert cache.read_text().strip() == second
    assert len(store.in_flight) == 0


def test_a_deleted_secret_is_left_to_the_caller_to_write_back():
    store = SecretStore(MemoryEtcd(Clock()), secret_key("ns"))
    assert store.changed(None) is False
    assert store.changed(b"not hex") is True
    assert store.secret is None
