"""EtcdService on the real reactor against real etcd servers."""

import json
import os
import signal
import uuid

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from bai_agent.etcd.interface import EtcdError
from bai_agent.etcd.service import EtcdService
from bai_agent.etcd.txetcd import TxEtcd
from bai_agent.testing.etcd_server import EtcdServer
from bai_agent.testing.waiting import sleep

pytestmark = pytest.mark.functional

ETCDCTL = "/usr/bin/etcdctl"


async def wait_for(reactor, check, timeout, what):
    """Await ``check()`` (async) until it returns something truthy; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            result = await check()
        except EtcdError:
            result = None
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        await sleep(reactor, 0.05)


async def etcdctl(reactor, server, *args):
    out, err, code = await getProcessOutputAndValue(
        ETCDCTL, ("--endpoints", server.url) + args, env=dict(os.environ, ETCDCTL_API="3"), reactor=reactor
    )
    assert code == 0, err.decode(errors="replace")
    return out.decode()


def make_record_source(agent_id, counter, kernels=None):
    """``kernels``: a one-item list the test may change, to change the record."""
    kernels = kernels if kernels is not None else [0]

    def record_source():
        counter.append(None)
        return {
            "agent_id": agent_id,
            "version": "0.1.0",
            "protocol": 1,
            "kernels": kernels[0],
            "amp_endpoint": "127.0.0.1:6001",
        }

    return record_source


def record_getter(client, key):
    async def get():
        raw = await client.get(key)
        return json.loads(raw) if raw is not None else None

    return get


@pytest_twisted.ensureDeferred
async def test_record_registered_refreshed_and_revoked_on_stop(reactor, etcd_server, tmp_path):
    namespace = "ft-" + uuid.uuid4().hex[:8]
    agent_id = "agent-real"
    key = f"/bai/{namespace}/agents/{agent_id}".encode()
    agent_etcd = TxEtcd(reactor, etcd_server.url)
    observer = TxEtcd(reactor, etcd_server.url)
    kernels = [0]
    service = EtcdService(
        reactor,
        agent_etcd,
        namespace,
        agent_id,
        make_record_source(agent_id, [], kernels),
        heartbeat_interval=0.5,
        secret_cache_path=str(tmp_path / "secret"),
    )
    service.setName("etcd")
    try:
        service.startService()
        record = await wait_for(reactor, record_getter(observer, key), 10, "record")
        assert record["agent_id"] == agent_id
        assert record["status"] == "running"
        assert service.registered

        listing = await etcdctl(reactor, etcd_server, "get", "--prefix", f"/bai/{namespace}/agents/")
        lines = listing.splitlines()
        assert lines[0] == key.decode()
        assert json.loads(lines[1])["agent_id"] == agent_id
        ttl = await etcdctl(reactor, etcd_server, "lease", "timetolive", f"{service.lease_id:x}")
        assert "granted with TTL(10s)" in ttl

        secret = await observer.get(f"/bai/{namespace}/config/agent/secret".encode())
        assert secret.decode() == service.secret

        first_beat = record["heartbeat_at"]

        async def kept_alive():
            return (service.last_heartbeat_at or 0) > first_beat

        await wait_for(reactor, kept_alive, 3, "a heartbeat (lease keep-alive)")
        ttl = await etcdctl(reactor, etcd_server, "lease", "timetolive", f"{service.lease_id:x}")
        assert "remaining(" in ttl and int(ttl.split("remaining(")[1].split("s")[0]) >= 8

        kernels[0] = 2  # the record changed: written at the next heartbeat

        async def rewritten():
            current = await record_getter(observer, key)()
            return current and current["kernels"] == 2 and current["heartbeat_at"] > first_beat

        await wait_for(reactor, rewritten, 3, "the changed record")

        await service.stopService()
        # Revoked, not left to expire: gone as soon as stop has finished.
        assert await observer.get(key) is None
        assert not service.registered
    finally:
        if service.running:
            await service.stopService()
        await agent_etcd.close()
        await observer.close()


@pytest_twisted.ensureDeferred
async def test_record_comes_back_after_etcd_restart_and_data_loss(reactor, tmp_path):
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    namespace = "restart"
    key = b"/bai/restart/agents/agent-r"
    secret_key = b"/bai/restart/config/agent/secret"
    agent_etcd = TxEtcd(reactor, server.url, timeout=2.0)
    observer = TxEtcd(reactor, server.url, timeout=2.0)
    service = EtcdService(
        reactor,
        agent_etcd,
        namespace,
        "agent-r",
        make_record_source("agent-r", []),
        heartbeat_interval=0.5,
        secret_cache_path=str(tmp_path / "state" / "secret"),
    )
    try:
        service.startService()
        await wait_for(reactor, record_getter(observer, key), 10, "first registration")
        first_lease = service.lease_id
        known_secret = service.secret

        server.stop()
        await wait_for(reactor, lambda: _async_value(not service.registered), 5, "noticing etcd is gone")
        assert service.last_error

        await sleep(reactor, 4.0)  # long enough for the backoff to grow past a few seconds
        server.start()  # same ports, same data
        started = reactor.seconds()
        await wait_for(reactor, fresh_record(observer, key, started), 10, "a fresh record after the restart")
        assert reactor.seconds() - started <= 10
        await wait_for(reactor, lambda: _async_value(service.registered), 5, "registered")
        assert service.lease_id != first_lease

        server.restart(wipe=True)  # etcd lost everything: record and secret come back
        started = reactor.seconds()
        record = await wait_for(reactor, fresh_record(observer, key, started), 10, "the record after data loss")
        assert reactor.seconds() - started <= 10
        assert record["status"] == "running"
        assert (await observer.get(secret_key)).decode() == known_secret

        await service.stopService()
        assert await observer.get(key) is None
    finally:
        if service.running:
            await service.stopService()
        await agent_etcd.close()
        await observer.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_stop_does_not_hang_when_etcd_hangs(reactor, tmp_path):
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    agent_etcd = TxEtcd(reactor, server.url)
    service = EtcdService(
        reactor,
        agent_etcd,
        "hang",
        "agent-h",
        make_record_source("agent-h", []),
        heartbeat_interval=0.5,
        secret_cache_path=str(tmp_path / "secret"),
    )
    try:
        service.startService()
        await wait_for(reactor, lambda: _async_value(service.registered), 10, "registered")
        os.kill(server.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        await sleep(reactor, 0.7)  # let a heartbeat get stuck
        began = reactor.seconds()
        await service.stopService()
        assert reactor.seconds() - began < 3.0
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        if service.running:
            await service.stopService()
        await agent_etcd.close()
        server.stop()


def fresh_record(client, key, since):
    """A check for a record written at or after ``since`` (reactor seconds)."""

    async def check():
        record = await record_getter(client, key)()
        return record if record and record["heartbeat_at"] >= since else None

    return check


async def _async_value(value):
    return value
