"""The IEtcd contract, run against TxEtcd and a real etcd server."""

from functools import partial

import pytest
import pytest_twisted

from bai_agent.etcd.interface import EtcdUnavailable
from bai_agent.etcd.txetcd import TxEtcd
from bai_agent.testing.etcd_contract import EtcdContractTests, poll_until

pytestmark = pytest.mark.functional


@pytest_twisted.async_yield_fixture
async def txetcd(etcd_server, reactor):
    client = TxEtcd(reactor, etcd_server.url)
    yield client
    await client.close()


class TestTxEtcdContract(EtcdContractTests):
    @pytest.fixture
    def etcd(self, txetcd):
        return txetcd

    @pytest.fixture
    def eventually(self, reactor):
        return partial(poll_until, reactor)


@pytest_twisted.ensureDeferred
async def test_selects_the_gateway_prefix_the_server_serves(txetcd):
    assert txetcd.gateway_prefix is None
    await txetcd.get(b"/probe")
    # etcd 3.4 serves /v3 (and /v3beta), not txaioetcd's /v3alpha.
    assert txetcd.gateway_prefix == "/v3"


@pytest_twisted.ensureDeferred
async def test_unreachable_etcd_fails_with_etcd_unavailable(reactor):
    from bai_agent.testing.etcd_server import _free_loopback_port

    client = TxEtcd(reactor, f"http://127.0.0.1:{_free_loopback_port()}", timeout=2.0)
    with pytest.raises(EtcdUnavailable):
        await client.get(b"/k")
    with pytest.raises(EtcdUnavailable):
        await client.grant_lease(10)
    watch = client.watch_prefix(b"/", lambda key, value: None)
    with pytest.raises(EtcdUnavailable):
        await watch.started
    with pytest.raises(EtcdUnavailable):
        await watch.done
    assert client.gateway_prefix is None
    await client.close()


# -- TxEtcd specifics: the gateway's stream framing and prefix selection ------------------


@pytest_twisted.ensureDeferred
async def test_watch_reassembles_documents_split_across_chunks(txetcd, reactor):
    """A value of a few hundred KiB arrives in many TCP reads; the event must be whole."""
    seen = []
    watch = txetcd.watch_prefix(b"/big/", lambda key, value: seen.append((key, value)))
    await watch.started
    big = bytes(range(256)) * 1024  # 256 KiB, ~350 KB of base64 in one JSON line
    await txetcd.put(b"/big/value", big)
    await txetcd.put(b"/big/small", b"after")
    await poll_until(reactor, lambda: len(seen) >= 2)
    assert seen == [(b"/big/value", big), (b"/big/small", b"after")]
    watch.cancel()


def test_watch_parser_accepts_any_chunking(reactor):
    """Feed a recorded gateway stream one byte at a time: same events, in order."""
    from bai_agent.etcd.txetcd import _GatewayWatch

    stream = (
        b'{"result":{"header":{"revision":"1"},"created":true}}\n'
        b'{"result":{"header":{"revision":"2"},"events":[{"kv":{"key":"cC9h",'
        b'"create_revision":"2","mod_revision":"2","version":"1","value":"Yg=="}}]}}\n'
        b'{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"cC9h",'
        b'"mod_revision":"3","version":"2"}}]}}\n'
        b'{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE",'
        b'"kv":{"key":"cC9h","mod_revision":"4"}}]}}\n'
        b'{"result":{"header":{"revision":"4"},"canceled":true,"compact_revision":"3"}}\n'
    )
    client = TxEtcd(reactor, "http://127.0.0.1:9")  # never contacted
    seen = []
    watch = _GatewayWatch(client, b"p/", lambda key, value: seen.append((key, value)), None)
    failures = []
    watch.done.addErrback(failures.append)
    for index in range(len(stream)):
        watch._received(stream[index : index + 1])
    assert watch.started.called
    assert seen == [(b"p/a", b"b"), (b"p/a", b""), (b"p/a", None)]
    assert len(failures) == 1
    assert "compacted at revision 3" in failures[0].getErrorMessage()


@pytest_twisted.ensureDeferred
async def test_gateway_prefix_probed_once_in_order(reactor):
    """A server that only has /v3alpha (etcd 3.2) is found after /v3 and /v3beta 404."""
    import json

    from twisted.web.resource import Resource
    from twisted.web.server import Site

    requested = []

    class AlphaOnlyGateway(Resource):
        isLeaf = True

        def render_POST(self, request):
            path = request.path.decode()
            requested.append(path)
            if not path.startswith("/v3alpha/"):
                request.setResponseCode(404)
                return b"404 page not found\n"
            return json.dumps({"header": {"revision": "1"}}).encode()

    port = reactor.listenTCP(0, Site(AlphaOnlyGateway()), interface="127.0.0.1")
    client = TxEtcd(reactor, f"http://127.0.0.1:{port.getHost().port}")
    try:
        assert await client.get(b"/k") is None
        assert await client.get_prefix(b"/p/") == {}
        assert client.gateway_prefix == "/v3alpha"
        assert requested == [
            "/v3/maintenance/status",
            "/v3beta/maintenance/status",
            "/v3alpha/maintenance/status",
            "/v3alpha/kv/range",
            "/v3alpha/kv/range",
        ]
    finally:
        await client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out_as_unavailable_and_cancel_stays_cancel(reactor):
    from twisted.internet.defer import CancelledError
    from twisted.internet.protocol import Factory, Protocol

    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    client = TxEtcd(reactor, f"http://127.0.0.1:{port.getHost().port}", timeout=0.3)
    try:
        began = reactor.seconds()
        with pytest.raises(EtcdUnavailable, match="no answer within"):
            await client.get(b"/k")
        assert reactor.seconds() - began < 2.0
        pending = client.get(b"/k")
        pending.cancel()
        with pytest.raises(CancelledError):
            await pending
    finally:
        await client.close()
        await port.stopListening()
