"""The status page, served in memory through treq's StubTreq."""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from bai_agent.status.page import StatusPage
from tests.unit.test_rpc_server import Harness


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


def get(harness, path):
    http = StubTreq(StatusPage(harness.state).app.resource())
    response = resolved(http.get(f"http://agent{path}"))
    body = resolved(response.content())
    http.flush()
    return response, body


def resolved(d):
    results = []
    d.addBoth(results.append)
    assert results, "the request did not complete"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_healthz_is_200_when_etcd_and_docker_are_healthy(harness):
    response, body = get(harness, "/healthz")
    assert response.code == 200
    assert body == b"ok\n"


def test_healthz_is_503_naming_etcd_when_unregistered(harness):
    harness.state.etcd.registered = False
    harness.state.etcd.last_error = "connection refused"
    response, body = get(harness, "/healthz")
    assert response.code == 503
    assert b"etcd: not registered (connection refused)" in body
    assert b"docker" not in body


def test_healthz_is_503_naming_docker_when_it_is_down(harness):
    harness.state.docker.healthy = False
    harness.state.docker.last_error = "no such socket"
    response, body = get(harness, "/healthz")
    assert response.code == 503
    assert b"docker: unreachable (no such socket)" in body


def test_status_json_tells_identity_health_and_resources(harness):
    harness.state.etcd.registered = False
    response, body = get(harness, "/status.json")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    status = json.loads(body)
    assert status["agent"]["agent_id"] == "agent-1"
    assert status["healthy"] is False
    assert status["etcd"]["registered"] is False
    assert status["docker"]["api_version"] == "1.41"
    assert status["agent"]["resources"]["mem"]["capacity"] == 8 << 30
    assert [image["name"] for image in status["images"]] == ["bai-kernel/python:3.11"]


def test_html_page_shows_the_agent_and_escapes_what_it_shows(harness):
    harness.state.docker.healthy = False
    harness.state.docker.last_error = "<script>alert(1)</script>"
    harness.state.note("Docker daemon unreachable")
    response, body = get(harness, "/")
    page = body.decode()
    assert response.code == 200
    assert "agent-1" in page
    assert "unhealthy" in page
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bai-kernel/python:3.11" in page
    assert "Docker daemon unreachable" in page


def test_metrics_are_valid_prometheus_text(harness):
    response, body = get(harness, "/metrics")
    assert response.code == 200
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert families["bai_agent_healthy"].samples[0].value == 1
    capacity = {s.labels["slot"]: s.value for s in families["bai_agent_resource_capacity"].samples}
    assert capacity == {"cpu": 4.0, "mem": float(8 << 30), "cuda.device": 0.0}


def test_a_failing_route_answers_500_without_a_traceback(harness):
    def broken():
        raise RuntimeError("secret internals")

    harness.state.record = broken
    response, body = get(harness, "/status.json")
    assert response.code == 500
    assert b"secret internals" not in body
    assert b"Traceback" not in body


def test_unknown_path_is_404(harness):
    response, _ = get(harness, "/nope")
    assert response.code == 404


def test_health_changes_become_recent_events(harness):
    harness.state.docker.healthy = False
    harness.state.watch_health()
    # Healthy at the first look is worth telling; unhealthy is not news yet (connecting).
    assert [message for _, message in harness.state.recent_events] == ["registered in etcd"]
    harness.state.recent_events.clear()
    harness.state.etcd.registered = False
    harness.state.etcd.last_error = "timeout"
    harness.clock.advance(5)
    harness.state.watch_health()
    harness.state.etcd.registered = True
    harness.state.watch_health()
    messages = [message for _, message in harness.state.recent_events]
    assert messages == ["etcd registration lost: timeout", "registered in etcd"]
