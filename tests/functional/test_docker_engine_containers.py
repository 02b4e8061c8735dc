"""
DockerEngineClient's container calls against a small twisted.web stand-in for the
daemon on a UNIX socket: the requests they send, the statuses they accept, the errors
they raise, their time limits, and how logs are demultiplexed.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError

from bai_agent.docker.engine import DockerEngineClient
from bai_agent.docker.interface import DockerConflict, DockerError, DockerNotFound

pytestmark = pytest.mark.functional


CID = "c0ffee" * 10 + "abcd"


def frame(stream_byte, payload):
    return bytes([stream_byte, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


@pytest_twisted.async_yield_fixture
async def client(reactor, daemon, socket_dir):
    # A short client timeout, to show which calls are not bound by it.
    client = DockerEngineClient(reactor, f"unix://{socket_dir}/d.sock", timeout=0.5)
    yield client
    await client.close()


@pytest_twisted.inlineCallbacks
def test_create_sends_the_name_and_the_config_as_is(client, daemon):
    daemon.routes[("POST", "/v1.41/containers/create")] = (201, {"Id": CID, "Warnings": ["w"]})
    config = {"Image": "bai-kernel/python:3.11", "HostConfig": {"NetworkMode": "none"}}
    container_id = yield client.create_container("bai-k1", config)
    assert container_id == CID
    assert daemon.last() == ("POST", "/v1.41/containers/create", {"name": ["bai-k1"]}, config)


@pytest_twisted.inlineCallbacks
def test_create_without_a_name_sends_none(client, daemon):
    daemon.routes[("POST", "/v1.41/containers/create")] = (201, {"Id": CID})
    yield client.create_container(None, {"Image": "x"})
    assert daemon.last()[2] == {}


@pytest_twisted.inlineCallbacks
def test_create_answer_without_an_id_is_a_docker_error(client, daemon):
    daemon.routes[("POST", "/v1.41/containers/create")] = (201, {"Warnings": []})
    with pytest.raises(DockerError, match="answered"):
        yield client.create_container("k", {"Image": "x"})


@pytest_twisted.inlineCallbacks
def test_409_is_a_conflict_with_the_daemons_message(client, daemon):
    message = 'Conflict. The container name "/k" is already in use by container "abc".'
    daemon.routes[("POST", "/v1.41/containers/create")] = (409, {"message": message})
    with pytest.raises(DockerConflict) as e:
        yield client.create_container("k", {"Image": "x"})
    assert (e.value.status, e.value.message) == (409, message)


@pytest.mark.parametrize("status", [204, 304])
@pytest_twisted.inlineCallbacks
def test_start_accepts_started_and_already_started(client, daemon, status):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/start")] = (status, b"")
    result = yield client.start_container(CID)
    assert result is None


@pytest_twisted.inlineCallbacks
def test_304_is_not_accepted_where_it_means_nothing(client, daemon):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/kill")] = (304, b"")
    with pytest.raises(DockerError) as e:
        yield client.kill_container(CID)
    assert e.value.status == 304


@pytest_twisted.inlineCallbacks
def test_container_names_are_quoted_in_paths(client, daemon):
    daemon.routes[("GET", "/v1.41/containers/odd name/json")] = (200, {"Id": CID})
    info = yield client.inspect_container("odd name")
    assert info == {"Id": CID}


@pytest_twisted.inlineCallbacks
def test_list_sends_label_filters_and_all(client, daemon):
    daemon.routes[("GET", "/v1.41/containers/json")] = (200, [{"Id": CID}])
    listed = yield client.list_containers(labels={"ai.backend.kernel-id": "k1", "owner": None})
    assert listed == [{"Id": CID}]
    args = daemon.last()[2]
    assert args["all"] == ["1"]
    assert json.loads(args["filters"][0]) == {"label": ["ai.backend.kernel-id=k1", "owner"]}
    yield client.list_containers(all=False)
    assert daemon.last()[2] == {"all": ["0"]}


@pytest_twisted.inlineCallbacks
def test_kill_sends_the_signal_and_a_stopped_container_conflicts(client, daemon):
    path = f"/v1.41/containers/{CID}/kill"
    daemon.routes[("POST", path)] = (204, b"")
    yield client.kill_container(CID, signal="SIGTERM")
    assert daemon.last()[2] == {"signal": ["SIGTERM"]}
    yield client.kill_container(CID)
    assert daemon.last()[2] == {"signal": ["SIGKILL"]}
    message = f"Cannot kill container: {CID}: Container {CID} is not running"
    daemon.routes[("POST", path)] = (409, {"message": message})
    with pytest.raises(DockerConflict, match="is not running"):
        yield client.kill_container(CID)


@pytest_twisted.inlineCallbacks
def test_stop_may_take_its_grace_period_beyond_the_client_timeout(client, daemon):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/stop")] = (204, b"", 0.8)
    yield client.stop_container(CID, timeout=1)
    assert daemon.last()[2] == {"t": ["1"]}
    daemon.routes[("POST", f"/v1.41/containers/{CID}/stop")] = (304, b"")
    yield client.stop_container(CID)  # not running: fine


@pytest_twisted.inlineCallbacks
def test_remove_sends_force_and_volumes(client, daemon):
    path = f"/v1.41/containers/{CID}"
    daemon.routes[("DELETE", path)] = (204, b"")
    yield client.remove_container(CID)
    assert daemon.last()[:3] == ("DELETE", path, {"force": ["1"], "v": ["1"]})
    yield client.remove_container(CID, force=False, volumes=False)
    assert daemon.last()[2] == {"force": ["0"], "v": ["0"]}
    in_progress = f"removal of container {CID} is already in progress"
    daemon.routes[("DELETE", path)] = (409, {"message": in_progress})
    with pytest.raises(DockerConflict, match="already in progress"):
        yield client.remove_container(CID)
    daemon.routes[("DELETE", path)] = (404, {"message": f"No such container: {CID}"})
    with pytest.raises(DockerNotFound, match="No such container"):
        yield client.remove_container(CID)


@pytest_twisted.inlineCallbacks
def test_wait_waits_for_not_running_beyond_the_client_timeout(client, daemon):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/wait")] = (
        200,
        {"StatusCode": 137, "Error": None},
        1.0,
    )
    exit_code = yield client.wait_container(CID)
    assert exit_code == 137
    assert daemon.last()[2] == {"condition": ["not-running"]}


@pytest_twisted.inlineCallbacks
def test_wait_can_be_cancelled(reactor, client, daemon):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/wait")] = (200, {"StatusCode": 0}, 30.0)
    waiting = client.wait_container(CID)
    reactor.callLater(0.1, waiting.cancel)
    with pytest.raises(CancelledError):
        yield waiting


@pytest_twisted.inlineCallbacks
def test_wait_answer_without_a_status_code_is_a_docker_error(client, daemon):
    daemon.routes[("POST", f"/v1.41/containers/{CID}/wait")] = (200, {"Error": {"Message": "x"}})
    with pytest.raises(DockerError, match="answered"):
        yield client.wait_container(CID)


def _logs_routes(daemon, tty, body):
    inspected = {"Id": CID, "Config": {"Tty": tty}}
    daemon.routes[("GET", f"/v1.41/containers/{CID}/json")] = (200, inspected)
    daemon.routes[("GET", f"/v1.41/containers/{CID}/logs")] = (200, body)


@pytest_twisted.inlineCallbacks
def test_logs_without_a_tty_are_demultiplexed_in_order(client, daemon):
    snow = "雪".encode()
    body = (
        frame(1, b"out\n")
        + frame(2, b"err\n")
        + frame(1, snow[:2])  # a character split over two frames
        + frame(1, snow[2:] + b"\xff\n")  # and a byte that is not UTF-8
    )
    _logs_routes(daemon, False, body)
    logs = yield client.container_logs(CID)
    assert logs == "out\nerr\n雪\ufffd\n"
    assert daemon.last()[2] == {"stdout": ["1"], "stderr": ["1"], "tail": ["all"]}
    yield client.container_logs(CID, tail=5)
    assert daemon.last()[2]["tail"] == ["5"]


@pytest_twisted.inlineCallbacks
def test_logs_with_a_tty_are_raw(client, daemon):
    # Raw terminal output that would be an invalid frame header if demultiplexed.
    _logs_routes(daemon, True, b"out\r\nerr\r\n")
    logs = yield client.container_logs(CID)
    assert logs == "out\r\nerr\r\n"


@pytest_twisted.inlineCallbacks
def test_logs_that_are_not_multiplexed_without_a_tty_are_a_docker_error(client, daemon):
    _logs_routes(daemon, False, b"out\n")
    with pytest.raises(DockerError, match="not a multiplexed stream"):
        yield client.container_logs(CID)


@pytest.mark.parametrize("tail", [-1, "5", 1.5, True])
@pytest_twisted.inlineCallbacks
def test_logs_refuse_a_bad_tail(client, daemon, tail):
    with pytest.raises(DockerError, match="tail"):
        yield client.container_logs(CID, tail=tail)
    assert daemon.requests == []


@pytest_twisted.inlineCallbacks
def test_logs_of_a_missing_container_are_not_found(client, daemon):
    with pytest.raises(DockerNotFound):
        yield client.container_logs(CID)


@pytest_twisted.inlineCallbacks
def test_update_sends_the_resources_and_returns_the_warnings(client, daemon):
    path = f"/v1.41/containers/{CID}/update"
    daemon.routes[("POST", path)] = (200, {"Warnings": None})
    resources = {"Memory": 1 << 26, "MemorySwap": 1 << 26}
    warnings = yield client.update_container(CID, resources)
    assert warnings == []
    assert daemon.last() == ("POST", path, {}, resources)
    daemon.routes[("POST", path)] = (200, {"Warnings": ["swap limit not supported"]})
    warnings = yield client.update_container(CID, resources)
    assert warnings == ["swap limit not supported"]
