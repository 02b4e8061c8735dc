"""
``/metrics`` passes Prometheus's own checker, ``promtool check metrics`` (Debian package
``prometheus``): no error and no lint complaint, for a state with kernels, GPUs (one of them
failing) and AMP commands observed, and for a real agent running a real kernel.
"""

import shutil
import subprocess
import time

import pytest
import pytest_twisted

from bai_agent.protocol.client import AgentClient
from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import running_agent
from tests.functional.test_kernels_real import IMAGE
from tests.unit.test_status_metrics import BusyAgent

pytestmark = pytest.mark.functional


def promtool_complaints(exposition: bytes) -> str:
    """What ``promtool check metrics`` says about ``exposition``; empty when all is well."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus; scripts/install-deps installs it)"
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    said = (result.stdout + result.stderr).decode(errors="replace").strip()
    if result.returncode != 0 and not said:
        said = f"promtool exited with {result.returncode}"
    return said


def test_promtool_finds_a_bad_exposition():
    # The checker itself: a counter without _total and a bad line are complaints.
    assert promtool_complaints(b"# HELP x_bytes X\n# TYPE x_bytes counter\nx_bytes 1\n")
    assert promtool_complaints(b"not metrics at all {\n")


def test_metrics_of_kernels_gpus_and_commands_pass_promtool(tmp_path):
    busy = BusyAgent(tmp_path)
    try:
        exposition = busy.state.metrics.render()
    finally:
        busy.close()
    assert b'bai_agent_kernel_cpu_seconds_total{kernel_id="k-train"}' in exposition
    assert b'bai_agent_gpu_up{device="1"} 0.0' in exposition
    assert b'bai_agent_amp_command_errors_total{code="KERNEL_NOT_FOUND",command="Execute"}' in exposition
    assert promtool_complaints(exposition) == ""


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    with running_agent(tmp_path, etcd_server.addr, "agent-prom") as process:
        yield process


@pytest_twisted.inlineCallbacks
def test_metrics_of_a_real_agent_with_a_kernel_pass_promtool(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    try:
        yield client.create_kernel("prom-1", IMAGE, {"cpu": 0.25, "mem": "128m"})
        sampled = b'bai_agent_kernel_cpu_seconds_total{kernel_id="prom-1"}'
        deadline = time.monotonic() + 30
        while True:
            code, exposition = agent.http("/metrics")
            assert code == 200, exposition
            if sampled in exposition:
                break
            assert time.monotonic() < deadline, f"no kernel statistics in /metrics after 30s:\n{exposition.decode()}"
            yield sleep(reactor, 0.5)
    finally:
        yield client.destroy_kernel("prom-1")
        client.close()
    assert b'bai_agent_amp_command_seconds_count{command="CreateKernel"} 1.0' in exposition
    assert b"bai_agent_node_cpus " in exposition
    assert promtool_complaints(exposition) == ""
