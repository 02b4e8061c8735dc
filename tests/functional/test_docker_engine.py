"""
DockerEngineClient's pure parts (docker_host parsing, version choice, the incremental
JSON stream decoder, URL quoting) and its HTTP behaviour against a small twisted.web
server on a UNIX socket standing in for the daemon.
"""

import json
import os

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from bai_agent.docker.address import DockerAddress, parse_docker_host
from bai_agent.docker.engine import DockerEngineClient, image_path, pick_api_version
from bai_agent.docker.interface import DockerError, DockerNotFound, DockerUnavailable
from bai_agent.docker.streams import JSONStreamDecoder, JSONStreamError
from bai_agent.testing.docker_host import docker_host_from_env, require_docker
from bai_agent.testing.waiting import sleep

pytestmark = pytest.mark.functional


# -- docker_host --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("unix:///var/run/docker.sock", DockerAddress("unix", path="/var/run/docker.sock")),
        ("tcp://127.0.0.1:2375", DockerAddress("tcp", host="127.0.0.1", port=2375)),
        ("tcp://docker.example:2376/", DockerAddress("tcp", host="docker.example", port=2376)),
        ("tcp://[::1]:2375", DockerAddress("tcp", host="::1", port=2375)),
    ],
)
def test_parse_docker_host_accepts_unix_and_tcp(value, expected):
    assert parse_docker_host(value) == expected


def test_base_url_brackets_ipv6_hosts():
    assert parse_docker_host("tcp://[::1]:2375").base_url == "http://[::1]:2375"
    assert parse_docker_host("unix:///s.sock").base_url == "http://docker"


@pytest.mark.parametrize(
    "value",
    [
        "",
        None,
        "/var/run/docker.sock",
        "unix://var/run/docker.sock",
        "unix://",
        "http://127.0.0.1:2375",
        "npipe:////./pipe/docker_engine",
        "tcp://127.0.0.1",
        "tcp://:2375",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:http",
        "tcp://127.0.0.1:2375/v1.41",
        "tcp://user@127.0.0.1:2375",
    ],
)
def test_parse_docker_host_rejects_bad_values_naming_them(value):
    with pytest.raises(ValueError) as e:
        parse_docker_host(value)
    assert repr(value) in str(e.value)


def test_client_rejects_bad_docker_host_at_construction():
    with pytest.raises(ValueError, match="tcp://nowhere"):
        DockerEngineClient(object(), "tcp://nowhere")


def test_docker_host_comes_from_the_environment_or_the_default_socket():
    assert docker_host_from_env({}) == "unix:///var/run/docker.sock"
    assert docker_host_from_env({"DOCKER_HOST": "tcp://127.0.0.1:2375"}) == "tcp://127.0.0.1:2375"


def test_require_docker_fails_with_how_to_start_it(monkeypatch, socket_dir):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_dir}/absent.sock")
    with pytest.raises(pytest.fail.Exception) as e:
        require_docker()
    assert "absent.sock" in str(e.value)
    assert "dockerd --bridge=none &" in str(e.value)


# -- API version --------------------------------------------------------------------


@pytest.mark.parametrize(
    "daemon, maximum, expected",
    [("1.41", "1.43", "1.41"), ("1.43", "1.43", "1.43"), ("1.47", "1.43", "1.43"), ("1.9", "1.43", None)],
)
def test_pick_api_version_caps_by_our_maximum(daemon, maximum, expected):
    if expected is None:
        with pytest.raises(DockerError, match="1.41 or newer"):
            pick_api_version(daemon, maximum)
    else:
        assert pick_api_version(daemon, maximum) == expected


@pytest.mark.parametrize("daemon", ["1.40", "1.12", None, "", "one.forty"])
def test_pick_api_version_refuses_old_or_missing_versions(daemon):
    with pytest.raises(DockerError):
        pick_api_version(daemon, "1.43")


def test_image_path_quotes_the_whole_name():
    assert image_path("bai/python:3.11", "/json") == "/images/bai%2Fpython%3A3.11/json"
    assert image_path("a?b#c d%", "/json") == "/images/a%3Fb%23c%20d%25/json"


# -- the incremental JSON stream decoder ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(st.text(max_size=8), json_values, max_size=5) | st.lists(json_values, max_size=4)


@given(
    values=st.lists(documents, max_size=6),
    separators=st.lists(st.sampled_from(["", "\n", " ", "\r\n", "\t\n "]), min_size=7, max_size=7),
    ensure_ascii=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_decoder_yields_every_value_whatever_the_chunking(values, separators, ensure_ascii, cuts):
    stream = "".join(json.dumps(v, ensure_ascii=ensure_ascii) + sep for v, sep in zip(values, separators)).encode(
        "utf-8"
    )
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = JSONStreamDecoder()
    decoded = []
    for start, end in zip(points, points[1:]):
        decoded.extend(decoder.feed(stream[start:end]))
    assert decoded == values
    assert not decoder.pending


def test_decoder_feeds_byte_by_byte_through_strings_with_brackets_and_escapes():
    events = [{"a": "}{][", "b": 'quote " and \\ backslash \\"}', "c": "é 雪 🐳"}, [1, {"x": []}]]
    stream = "\n".join(json.dumps(e, ensure_ascii=False) for e in events).encode("utf-8")
    decoder = JSONStreamDecoder()
    decoded = []
    for i in range(len(stream)):
        decoded.extend(decoder.feed(stream[i : i + 1]))
        if i < len(stream) - 1:
            assert decoder.pending or decoded
    assert decoded == events


def test_decoder_holds_back_an_unfinished_value():
    decoder = JSONStreamDecoder()
    assert decoder.feed(b'{"status": "tag"}\n{"status": "unt') == [{"status": "tag"}]
    assert decoder.pending
    assert decoder.feed(b'ag"}') == [{"status": "untag"}]
    assert not decoder.pending


def test_decoder_waits_when_a_chunk_ends_on_a_backslash():
    decoder = JSONStreamDecoder()
    assert decoder.feed(b'{"a": "x\\') == []
    assert decoder.feed(b'"y"}') == [{"a": 'x"y'}]


@pytest.mark.parametrize(
    "stream",
    [b'"a string"', b"42\n", b"null", b'{"a": 1}}', b'{"a": tru}', b'{"a": 1]', b"\xff{}", b'{"\xff": 1}'],
)
def test_decoder_rejects_what_is_not_a_stream_of_objects(stream):
    decoder = JSONStreamDecoder()
    with pytest.raises(JSONStreamError):
        decoder.feed(stream)


def test_decoder_bounds_the_size_of_one_value():
    decoder = JSONStreamDecoder(max_value_size=100)
    decoder.feed(b'{"a": "' + b"x" * 50)
    with pytest.raises(JSONStreamError, match="larger than 100"):
        decoder.feed(b"x" * 60)


# -- HTTP against a stand-in daemon ---------------------------------------------------


@pytest_twisted.async_yield_fixture
async def client(reactor, daemon, socket_dir):
    client = DockerEngineClient(reactor, f"unix://{socket_dir}/d.sock", timeout=5.0)
    yield client
    await client.close()


@pytest_twisted.inlineCallbacks
def test_calls_are_versioned_after_negotiation(client, daemon):
    daemon.api_version = "1.44"
    daemon.routes["/v1.43/images/json"] = (200, [{"Id": "sha256:1"}])
    images = yield client.list_images()
    assert images == [{"Id": "sha256:1"}]
    assert client.api_version == "1.43"
    assert daemon.requests == [("GET", "/version"), ("GET", "/v1.43/images/json")]


@pytest_twisted.inlineCallbacks
def test_request_helper_sends_json_bodies_only_when_given(client, daemon):
    daemon.routes["/v1.41/containers/create"] = (201, {"Id": "c1", "Warnings": []})
    created = yield client._request(
        "POST", "/containers/create", json={"Image": "bai/python:3.11"}, params={"name": "k1"}
    )
    assert created == {"Id": "c1", "Warnings": []}
    assert daemon.requests[-1] == ("POST", "/v1.41/containers/create?name=k1")
    content_type, body = daemon.bodies[-1]
    assert content_type.startswith("application/json")
    assert json.loads(body) == {"Image": "bai/python:3.11"}
    assert all(body == b"" for _, body in daemon.bodies[:-1])  # the GET /version


@pytest_twisted.inlineCallbacks
def test_negotiation_refuses_an_old_daemon(client, daemon):
    daemon.api_version = "1.40"
    with pytest.raises(DockerError, match="1.41 or newer"):
        yield client.negotiate()
    assert client.api_version is None


@pytest_twisted.inlineCallbacks
def test_inspect_image_sends_the_quoted_name(client, daemon):
    daemon.routes["/v1.41/images/bai/python:3.11?x/json"] = (200, {"Id": "sha256:2"})
    doc = yield client.inspect_image("bai/python:3.11?x")
    assert doc == {"Id": "sha256:2"}
    assert daemon.requests[-1] == ("GET", "/v1.41/images/bai%2Fpython%3A3.11%3Fx/json")


@pytest_twisted.inlineCallbacks
def test_404_is_not_found_with_the_daemons_message(client, daemon):
    with pytest.raises(DockerNotFound) as e:
        yield client.inspect_image("missing")
    assert e.value.status == 404
    assert e.value.message == "page not found: /v1.41/images/missing/json"


@pytest_twisted.inlineCallbacks
def test_error_status_is_a_docker_error_with_the_daemons_message(client, daemon):
    daemon.routes["/v1.41/images/json"] = (500, {"message": "disk on fire"})
    with pytest.raises(DockerError) as e:
        yield client.list_images()
    assert type(e.value) is DockerError
    assert (e.value.status, e.value.message) == (500, "disk on fire")


@pytest_twisted.inlineCallbacks
def test_invalid_json_answer_is_a_docker_error(client, daemon):
    daemon.routes["/v1.41/images/json"] = (200, b"[{not json")
    with pytest.raises(DockerError, match="invalid JSON"):
        yield client.list_images()


@pytest_twisted.inlineCallbacks
def test_missing_socket_is_unavailable(reactor, socket_dir):
    client = DockerEngineClient(reactor, f"unix://{socket_dir}/none.sock", timeout=5.0)
    with pytest.raises(DockerUnavailable) as e:
        yield client.ping()
    assert e.value.status is None
    stream = client.stream_events(lambda event: None)
    with pytest.raises(DockerUnavailable):
        yield stream.done


@pytest_twisted.inlineCallbacks
def test_a_daemon_that_never_answers_times_out_as_unavailable(reactor, socket_dir):
    class Silent(Resource):
        isLeaf = True

        def render(self, request):
            return NOT_DONE_YET

    port = reactor.listenUNIX(os.path.join(socket_dir, "silent.sock"), Site(Silent()))
    client = DockerEngineClient(reactor, f"unix://{socket_dir}/silent.sock", timeout=0.2)
    try:
        with pytest.raises(DockerUnavailable, match="no answer within 0.2s"):
            yield client.ping()
    finally:
        yield client.close()
        yield port.stopListening()


@inlineCallbacks
def wait_for_stream(reactor, daemon, count=1):
    for _ in range(100):
        if len(daemon.event_requests) >= count:
            return daemon.event_requests[count - 1]
        yield sleep(reactor, 0.01)
    raise AssertionError("the events request never arrived")


def _wait_for_events(reactor, events, count):
    @inlineCallbacks
    def wait():
        for _ in range(200):
            if len(events) >= count:
                return
            yield sleep(reactor, 0.01)

    return wait()


@pytest_twisted.inlineCallbacks
def test_events_arrive_whole_across_chunk_boundaries(reactor, client, daemon):
    events = []
    stream = client.stream_events(events.append, filters={"type": ["image"]})
    request = yield wait_for_stream(reactor, daemon)
    assert json.loads(request.args[b"filters"][0]) == {"type": ["image"]}
    body = (json.dumps({"Action": "tag", "name": "雪"}, ensure_ascii=False) + "\n").encode() * 2
    cut = body.index("雪".encode()) + 1  # inside the UTF-8 character
    request.write(body[:cut])
    yield sleep(reactor, 0.05)
    assert events == []
    request.write(body[cut:])
    yield _wait_for_events(reactor, events, 2)
    assert events == [{"Action": "tag", "name": "雪"}] * 2
    request.finish()
    result = yield stream.done
    assert result is None


@pytest_twisted.inlineCallbacks
def test_a_consumer_exception_does_not_end_the_stream(reactor, client, daemon):
    seen = []

    def consumer(event):
        seen.append(event)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    stream = client.stream_events(consumer)
    request = yield wait_for_stream(reactor, daemon)
    request.write(b'{"n": 1}{"n": 2}')
    yield _wait_for_events(reactor, seen, 2)
    assert seen == [{"n": 1}, {"n": 2}]
    assert not stream.done.called
    stream.cancel()


@pytest_twisted.inlineCallbacks
def test_a_stream_ending_inside_an_event_is_an_error(reactor, client, daemon):
    stream = client.stream_events(lambda event: None)
    request = yield wait_for_stream(reactor, daemon)
    request.write(b'{"Action": "ta')
    request.finish()
    with pytest.raises(DockerError, match="ended inside a message"):
        yield stream.done


@pytest_twisted.inlineCallbacks
def test_a_broken_connection_fails_the_stream_as_unavailable(reactor, client, daemon):
    stream = client.stream_events(lambda event: None)
    request = yield wait_for_stream(reactor, daemon)
    request.write(b'{"a": 1}\n')
    request.transport.abortConnection()
    with pytest.raises(DockerUnavailable):
        yield stream.done


@pytest_twisted.inlineCallbacks
def test_garbage_in_the_stream_fails_it(reactor, client, daemon):
    stream = client.stream_events(lambda event: None)
    request = yield wait_for_stream(reactor, daemon)
    request.write(b"<html>proxy error</html>")
    with pytest.raises(DockerError, match="not JSON"):
        yield stream.done


@pytest_twisted.inlineCallbacks
def test_cancel_fires_done_and_stops_delivery(reactor, client, daemon):
    events = []
    stream = client.stream_events(events.append)
    request = yield wait_for_stream(reactor, daemon)
    stream.cancel()
    result = yield stream.done
    assert result is None
    # The server sees the connection go before the response finished.
    lost = yield request.notifyFinish().addCallbacks(lambda _: None, lambda failure: failure.value)
    assert lost is not None
    request.write(b'{"late": 1}')
    yield sleep(reactor, 0.05)
    assert events == []


@pytest_twisted.inlineCallbacks
def test_cancel_before_the_stream_opens(reactor, client, daemon):
    stream = client.stream_events(lambda event: None)
    stream.cancel()
    result = yield stream.done
    assert result is None


@pytest_twisted.inlineCallbacks
def test_close_ends_open_streams(reactor, client, daemon):
    stream = client.stream_events(lambda event: None)
    yield wait_for_stream(reactor, daemon)
    yield client.close()
    assert stream.done.called
    result = yield stream.done
    assert result is None


@pytest_twisted.inlineCallbacks
def test_a_file_that_grew_after_its_stat_is_not_read_whole(reactor, socket_dir):
    import base64
    import io
    import tarfile

    grown = io.BytesIO()
    with tarfile.open(fileobj=grown, mode="w:") as archive:
        member = tarfile.TarInfo("def.json")
        member.size = 8 << 20
        archive.addfile(member, io.BytesIO(b"x" * member.size))
    stat = base64.b64encode(json.dumps({"name": "def.json", "size": 10, "mode": 0o644}).encode())

    class Lying(Resource):
        """Says the file is 10 bytes, then sends an archive of 8 MiB."""

        isLeaf = True
        sent = 0

        def render(self, request):
            if request.path.endswith(b"/version"):
                return json.dumps({"Version": "20.10.99", "ApiVersion": "1.41"}).encode()
            request.setHeader(b"X-Docker-Container-Path-Stat", stat)
            if request.method == b"HEAD":
                return b""
            Lying.sent = len(grown.getvalue())
            return grown.getvalue()

    port = reactor.listenUNIX(os.path.join(socket_dir, "lying.sock"), Site(Lying()))
    client = DockerEngineClient(reactor, f"unix://{socket_dir}/lying.sock", timeout=5.0)
    try:
        with pytest.raises(DockerError, match="over"):
            yield client.read_file("c" * 64, "/etc/def.json", 64 * 1024)
        assert Lying.sent > 8 << 20  # the daemon did send it all; the client stopped reading
    finally:
        yield client.close()
        yield port.stopListening()
