"""
Services (docs/protocol.md section 7) on real Docker through a real agent whose kernels
have no network (``--kernel-network none``): Jupyter from the data-science image answers
through the agent's relay and writes into the kernel's home; 30 requests at once; a stop
and a destroy close the host port; an undeclared service is SERVICE_NOT_FOUND; a service
whose program dies at start is SERVICE_START_FAILED with its output.
"""

import concurrent.futures
import json
import socket
import urllib.request

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from tests.functional.test_rich_output_real import sci_image  # noqa: F401 (fixture)

pytestmark = pytest.mark.functional


def get(url, method="GET", body=None, timeout=30):
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def refused(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def sci_kernel(client, sci_image):  # noqa: F811
    pytest_twisted.blockon(client.create_kernel("svc", sci_image, {"cpu": 1, "mem": "1g"}))
    return "svc"


@pytest_twisted.inlineCallbacks
def test_jupyter_answers_through_the_relay_and_writes_into_the_home(agent, client, sci_kernel):
    listed = yield client.list_services(sci_kernel)
    assert [(s["name"], s["status"], s["port"]) for s in listed] == [("jupyter", "declared", None)]
    endpoint = yield client.start_service(sci_kernel, "jupyter", {"timeout": 90})
    assert endpoint["service"] == "jupyter" and endpoint["protocol"] == "http"
    assert endpoint["host"] == "127.0.0.1" and 30000 <= endpoint["port"] <= 31000
    token = endpoint["url"].split("token=")[1]
    assert endpoint["url"] == f"http://127.0.0.1:{endpoint['port']}/?token={token}" and len(token) >= 32
    # Again: the same endpoint, not a second Jupyter.
    assert (yield client.start_service(sci_kernel, "jupyter", {"timeout": 90})) == endpoint
    base = f"http://127.0.0.1:{endpoint['port']}"
    status, body = get(f"{base}/api/status?token={token}")
    assert status == 200 and "started" in json.loads(body)
    content = json.dumps({"type": "file", "format": "text", "content": "written by jupyter\n"}).encode()
    status, _ = get(f"{base}/api/contents/from-jupyter.txt?token={token}", "PUT", content)
    assert status in (200, 201)
    downloaded = yield client.download_file(sci_kernel, "from-jupyter.txt")
    assert downloaded["data"] == b"written by jupyter\n"
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: get(f"{base}/api/contents?token={token}")[0], range(30)))
    assert answers == [200] * 30
    metrics = agent.http("/metrics")[1].decode()
    relayed = [
        line
        for line in metrics.splitlines()
        if line.startswith('bai_agent_service_relay_connections_total{outcome="relayed"}')
    ]
    assert relayed and float(relayed[0].split()[-1]) >= 32, relayed
    [running] = yield client.list_services(sci_kernel)
    assert running["status"] == "running" and running["port"] == endpoint["port"]
    [kernel] = [k for k in (yield client.list_kernels()) if k["kernel_id"] == sci_kernel]
    assert kernel["services"][0]["url"] == endpoint["url"]
    yield client.stop_service(sci_kernel, "jupyter")
    assert refused("127.0.0.1", endpoint["port"])
    [stopped] = yield client.list_services(sci_kernel)
    assert stopped["status"] == "exited" and stopped["port"] is None
    with pytest.raises(errors.ServiceNotFound):
        yield client.stop_service(sci_kernel, "jupyter")
    # Started again: a new port (the old one cools down), and a destroy closes it.
    again = yield client.start_service(sci_kernel, "jupyter", {"timeout": 90})
    assert again["port"] != endpoint["port"]
    assert get(f"http://127.0.0.1:{again['port']}/api/status?{again['url'].split('?')[1]}")[0] == 200
    yield client.destroy_kernel(sci_kernel)
    assert refused("127.0.0.1", again["port"])


@pytest_twisted.inlineCallbacks
def test_an_undeclared_service_is_not_found(client, sci_kernel):
    with pytest.raises(errors.ServiceNotFound):
        yield client.start_service(sci_kernel, "sshd")
    with pytest.raises(errors.InvalidRequest):
        yield client.start_service(sci_kernel, "../jupyter")


@pytest_twisted.inlineCallbacks
def test_a_service_that_dies_at_start_fails_with_its_output(client, sci_kernel):
    # The kernel's user cannot change the image's definition, but can break what it runs:
    # a notebook config that raises at import makes Jupyter exit at once.
    config = b"raise SystemExit('broken on purpose by the test')\n"
    yield client.upload_file(sci_kernel, ".jupyter/jupyter_notebook_config.py", config)
    with pytest.raises(errors.ServiceStartFailed, match="broken on purpose"):
        yield client.start_service(sci_kernel, "jupyter", {"timeout": 60})
    [service] = yield client.list_services(sci_kernel)
    assert service["status"] == "exited" and service["port"] is None


def test_ctl_jupyter_prints_a_url_that_opens_jupyter(agent, sci_image):  # noqa: F811
    done = agent.ctl("--timeout", "60", "jupyter", agent.agent_id, "--kernel-id", "ctl-jupyter")
    assert done.returncode == 0, done.stderr
    head, url = done.stdout.strip().splitlines()
    assert head == "kernel ctl-jupyter: Jupyter at" and url.startswith("http://127.0.0.1:")
    status, body = get(url)
    assert status == 200 and b"Jupyter" in body
    listed = agent.ctl("service", "ls", agent.agent_id, "ctl-jupyter")
    assert listed.returncode == 0 and "running" in listed.stdout and url in listed.stdout
    stopped = agent.ctl("service", "stop", agent.agent_id, "ctl-jupyter", "jupyter")
    assert stopped.returncode == 0, stopped.stderr
    missing = agent.ctl("service", "start", agent.agent_id, "ctl-jupyter", "sshd")
    assert missing.returncode == 1 and "declares no service 'sshd'" in missing.stderr
    assert agent.ctl("destroy", agent.agent_id, "ctl-jupyter").returncode == 0
