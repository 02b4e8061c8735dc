"""The status page, served in memory through treq's StubTreq."""

import html
import json
import math
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from bai_agent.testing.deferreds import result_of
from tests.unit.test_rpc_server import Harness
from tests.unit.test_status_metrics import NOW, BusyAgent, FakeStats, kernel_sample


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def busy(tmp_path):
    agent = BusyAgent(tmp_path)
    yield agent
    agent.close()


def get(harness, path):
    http = StubTreq(harness.state.status_page().app.resource())
    response = result_of(http.get(f"http://agent{path}"))
    body = result_of(response.content())
    http.flush()
    return response, body


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

    harness.state.info = broken
    response, body = get(harness, "/status.json")
    assert response.code == 500
    assert b"secret internals" not in body
    assert b"Traceback" not in body


def test_unknown_path_is_404(harness):
    response, _ = get(harness, "/nope")
    assert response.code == 404


def test_health_changes_become_recent_events(harness):
    harness.state.docker.healthy = False
    harness.state.health.watch()
    # Healthy at the first look is worth telling; unhealthy is not news yet (connecting).
    assert [message for _, message in harness.state.recent_events] == ["registered in etcd"]
    harness.state.recent_events.clear()
    harness.state.etcd.registered = False
    harness.state.etcd.last_error = "timeout"
    harness.clock.advance(5)
    harness.state.health.watch()
    harness.state.etcd.registered = True
    harness.state.health.watch()
    messages = [message for _, message in harness.state.recent_events]
    assert messages == ["etcd registration lost: timeout", "registered in etcd"]


def strict_json(body):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


def section(page, name):
    """The markup of one of the page's sections (``<div id=...>`` / ``<header id=...>``)."""
    match = re.search(rf'id="{name}">(.*?)</(?:div></section|header)>', page, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def text(markup):
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", markup)).strip())


def rows(markup):
    return [text(row) for row in re.findall(r"<tr>(.*?)</tr>", markup, re.S)]


def test_status_json_keeps_its_keys_and_adds_statistics(busy):
    _, body = get(busy, "/status.json")
    status = strict_json(body)
    assert {
        "agent",
        "healthy",
        "problems",
        "uptime",
        "etcd",
        "docker",
        "images",
        "kernels",
        "now",
        "connections",
        "events",
    } <= set(status)
    assert status["etcd"]["heartbeat_delay"] == 0.25
    assert status["etcd"]["heartbeat_delay_max"] == 1.5
    assert status["journal"] == {"entries": 3, "last_seq": 3}
    assert status["stats"]["sample_seconds"] == 0.0042
    assert status["stats"]["kernels"]["k-train"]["cpu_util"] == 150.0
    assert status["stats"]["node"]["cpu"]["per_core"] == [100.0, 50.0, 0.0, 100.0]
    gpus = {gpu["index"]: gpu for gpu in status["gpus"]}
    assert gpus[0]["kernel_id"] == "k-train" and gpus[0]["util_percent"] == 87
    assert gpus[1]["kernel_id"] is None and gpus[1]["error"] == "GPU is lost"
    assert [kernel["kernel_id"] for kernel in status["kernels"]] == ["k-train", "k-idle"]


def test_status_json_stays_strict_json_when_a_reading_is_not_a_number(busy):
    busy.state.stats.kernels["k-idle"] = kernel_sample(cpu_util=math.nan, mem_bytes=math.inf)
    busy.state.stats.node["cpu"]["percent"] = math.nan
    busy.state.stats.sample_seconds = math.inf
    _, body = get(busy, "/status.json")
    status = strict_json(body)
    assert "cpu_util" not in status["stats"]["kernels"]["k-idle"]
    assert "mem_bytes" not in status["stats"]["kernels"]["k-idle"]
    assert status["stats"]["node"]["cpu"]["percent"] is None
    assert status["stats"]["sample_seconds"] is None


def test_kernel_table_shows_image_status_age_idle_and_measured_use(busy):
    _, body = get(busy, "/")
    table = rows(section(body.decode(), "kernels"))
    assert table[0].startswith("kernel image status age idle CPU")
    assert table[1:] == [
        "k-train bai-kernel/python:3.11 running 2h 0m 0s 0m 5s 1.5 of 2 cores 0,1 3.0 GiB of 4.0 GiB 0 5.0 MiB"
        " jupyter http://10.0.0.5:30001/ ssh 10.0.0.5:30002 tensorboard starting",
        "k-idle bai-kernel/python:3.11 running 10m 0s 9m 0s 0 of 0.5 20 MiB of 512 MiB - 0 B -",
        # An image pull in progress, under the kernels.
        "pulling reg.example:5000/team/python:3.12 12 MiB of 48 MiB 0m 7s 2 waiting",
        # The warm pool's containers, apart from the kernels.
        "warm pool bai-kernel/python:3.11 2 ready of 3 1 filling",
    ]
    assert "warm pool: 7 claims, 1 misses, last refill 235 ms" in section(body.decode(), "kernels")
    # An HTTP service links to its relay, with no token (the page is unauthenticated).
    assert '<a href="http://10.0.0.5:30001/">jupyter</a>' in body.decode()
    assert "token" not in section(body.decode(), "kernels")
    # The CPU bar is measured cores against granted cores: 1.5 of 2.
    assert '<span class="use" style="width:75.0%">' in section(body.decode(), "kernels")


def test_resource_bars_show_allocation_and_measured_use(busy):
    _, body = get(busy, "/")
    resources = section(body.decode(), "resources")
    lines = rows(resources)
    assert lines[0] == "CPU 2.5 of 4 cores allocated 63% busy (2.5 of 4 cores)"
    assert lines[1] == "memory 4.5 GiB of 12 GiB allocated 6.0 GiB of 16 GiB in use"
    assert lines[2] == "scratch disk 25 GiB of 100 GiB used /var/lib/bai/scratch"
    assert lines[3] == "GPUs 1 of 2 allocated"
    assert lines[4] == "GPU 0 NVIDIA H100 87% busy · kernel k-train 40 GiB of 80 GiB memory"
    assert lines[5] == "GPU 1 NVIDIA H100 GPU is lost · free"
    bars = re.findall(r'<div class="bar"[^>]*>(.*?)</div>', resources)
    assert bars[0] == '<span class="alloc" style="width:62.5%"></span><span class="use" style="width:62.5%"></span>'
    assert bars[1] == '<span class="alloc" style="width:37.5%"></span><span class="use" style="width:37.5%"></span>'
    assert bars[4] == '<span class="alloc" style="width:100.0%"></span><span class="use" style="width:87.0%"></span>'
    assert bars[5] == '<span class="alloc" style="width:0.0%"></span>'
    cores = re.findall(r'<i style="height:(\d+)%">', resources)
    assert cores == ["100", "50", "0", "100"]


def test_health_shows_heartbeat_delay_journal_and_sampling(busy):
    busy.state.etcd.heartbeat_delay = 3.5  # later than a whole interval (3 s)
    _, body = get(busy, "/")
    health = rows(section(body.decode(), "health"))
    assert health[0] == "etcd registered 127.0.0.1:2379"
    assert health[1] == "heartbeat 3.500 s late (max 1.500 s) every 3 s, last 2023-11-14 22:13:19 UTC"
    assert health[2].startswith("Docker reachable API 1.41, Docker 20.10")
    assert health[3] == "events 3 kept last seq 3"
    assert health[4] == "statistics last 2023-11-14 22:13:20 UTC, took 4.2 ms CPU"
    assert '<span class="warn">3.500 s late</span>' in body.decode()


@pytest.mark.parametrize("stats", [None, "empty"])
def test_a_just_started_agent_renders_without_statistics(tmp_path, stats):
    harness = Harness(tmp_path, stats=FakeStats() if stats == "empty" else None)
    response, body = get(harness, "/")
    page = body.decode()
    assert response.code == 200
    assert rows(section(page, "kernels"))[1:] == ["no kernels"]
    assert rows(section(page, "events")) == ["no events yet"]
    assert "measured use (not sampled yet)" in page
    assert rows(section(page, "health"))[4] == "statistics not sampled yet"
    assert rows(section(page, "resources"))[:2] == ["CPU 0 of 4 cores allocated", "memory 0 B of 8.0 GiB allocated"]
    _, body = get(harness, "/status.json")
    status = strict_json(body)
    assert status["stats"] == {"node": None, "kernels": {}, "sample_seconds": None if stats is None else 0.0}
    assert status["journal"] == {"entries": 0, "last_seq": 0}


def test_everything_from_outside_is_escaped(busy):
    hostile = '<img src=x onerror="alert(1)">'
    busy.state.kernels.add("k-<b>", hostile, 0.25, 64 << 20, created_at=NOW, last_used=NOW)
    busy.state.stats.kernels["k-<b>"] = kernel_sample()
    busy.state.stats.node["gpus"][1]["name"] = hostile
    busy.state.stats.node["gpus"][1]["error"] = hostile
    busy.state.stats.node["disk"]["path"] = hostile
    busy.state.journal.append("kernel-started", "k-<b>")
    busy.state.note(hostile)
    _, body = get(busy, "/")
    page = body.decode()
    assert "<img" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "k-&lt;b&gt;" in page
    assert "#4 kernel-started k-&lt;b&gt;" in page


def test_page_works_without_javascript_and_loads_nothing_from_elsewhere(busy):
    response, body = get(busy, "/")
    page = body.decode()
    # Without JavaScript the page reloads itself; with it, the script redraws from status.json.
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert 'fetch("status.json"' in page
    assert not re.search(r"\bsrc=|<link\b", page)
    # The only links are the kernels' services (followed by a click, never loaded).
    assert set(re.findall(r"<(\w+) [^>]*\bhref=", page)) == {"a"}
    assert "@import" not in page and "url(" not in page
    policy = response.headers.getRawHeaders(b"content-security-policy")[0]
    assert b"default-src 'none'" in policy and b"connect-src 'self'" in policy
