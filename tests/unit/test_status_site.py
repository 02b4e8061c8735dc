"""StatusSite: a request must arrive, headers and body, within the deadline (slowloris), on task.Clock."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.web.resource import Resource

from bai_agent.status.site import ABORT_AFTER, MAX_BODY, REQUEST_TIMEOUT, StatusSite

GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Fine(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"fine"

    render_POST = render_GET


class Client:
    def __init__(self, site):
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes):
        self.channel.dataReceived(data)

    def received(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closed(self):
        return self.transport.disconnecting

    @property
    def aborted(self):
        return bool(self.transport.disconnected)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def site(clock):
    site = StatusSite(Fine(), clock)
    site.noisy = False
    site.doStart()
    yield site
    site.doStop()


def test_headers_that_never_end_are_closed_at_the_deadline(site, clock):
    client = Client(site)
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for line in range(int(REQUEST_TIMEOUT) - 1):
        clock.advance(1.0)
        client.send(b"X-Slow-%d: still typing\r\n" % line)
        assert not client.closed
    with capturedLogs() as events:
        clock.advance(1.0)
    assert client.closed and not client.aborted
    assert any("no complete request" in event["log_format"] for event in events)
    # A client that does not read what is left to write is cut off.
    clock.advance(ABORT_AFTER)
    assert client.aborted


def test_a_request_in_time_is_answered_and_a_kept_alive_connection_gets_a_new_deadline(site, clock):
    client = Client(site)
    clock.advance(REQUEST_TIMEOUT - 1)
    client.send(GET)
    response = client.received()
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"fine")
    assert not client.closed
    clock.advance(REQUEST_TIMEOUT - 1)
    client.send(GET)
    assert client.received().endswith(b"fine")
    # Idle after its response, a kept-alive connection goes at the deadline as well.
    clock.advance(REQUEST_TIMEOUT - 0.1)
    assert not client.closed
    clock.advance(0.1)
    assert client.closed


def test_pipelined_requests_are_all_answered(site, clock):
    client = Client(site)
    client.send(GET * 3)
    assert client.received().count(b"HTTP/1.1 200") == 3
    assert not client.closed


def test_a_slow_body_is_cut_off_at_the_deadline(site, clock):
    client = Client(site)
    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
    for _ in range(int(REQUEST_TIMEOUT) - 1):
        clock.advance(1.0)
        client.send(b"x")
        assert not client.closed
    clock.advance(1.0)
    assert client.closed


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: %d\r\n" % (MAX_BODY + 1),
        b"Content-Length: %d\r\n" % (10 << 30),
        b"Transfer-Encoding: chunked\r\n",
    ],
)
def test_a_body_the_page_would_not_read_is_refused_without_being_taken(site, clock, headers):
    client = Client(site)
    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n" + b"x" * 100_000)
    assert client.received().startswith(b"HTTP/1.1 413")
    assert client.closed
    request = client.channel.requests[-1]
    assert request.content is None  # never spooled to a temporary file
    client.send(b"x" * 100_000)  # what still comes is dropped
    clock.advance(REQUEST_TIMEOUT)
    clock.advance(ABORT_AFTER)
    assert client.aborted


def test_a_small_body_is_taken(site, clock):
    client = Client(site)
    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello")
    assert client.received().startswith(b"HTTP/1.1 ")
    assert not client.closed


def test_the_deadline_is_cancelled_when_the_connection_goes(site, clock):
    client = Client(site)
    client.channel.connectionLost(None)
    assert not any("overdue" in repr(call) for call in clock.getDelayedCalls())
