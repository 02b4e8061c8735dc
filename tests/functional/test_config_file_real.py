"""
A real agent (``python -m twisted bai-agent``) configured from a TOML file: the file's
values apply, the command line wins over it, and a bad file stops the start with a message
naming the file and the key.
"""

import json
import os

import pytest

from tests.functional.agent_process import AgentProcess, running_agent

pytestmark = pytest.mark.functional


def test_an_agent_runs_from_a_config_file(tmp_path, etcd_server, docker_host):
    config = tmp_path / "agent.toml"
    # The test's command line sets the heartbeat to 1 s: it wins over the file's 30.
    config.write_text('reserved_cpu = 0.5\nreserved-mem = "64m"\nheartbeat-interval = 30\n')
    with running_agent(tmp_path, etcd_server.addr, "agent-toml", ["--config", str(config)]) as agent:
        code, body = agent.http("/status.json")
        assert code == 200, body
        snapshot = json.loads(body)
        assert snapshot["etcd"]["heartbeat_interval"] == 1
        info = agent.ctl("info", agent.agent_id)
        assert info.returncode == 0, info.stderr
        record = json.loads(info.stdout)
    assert record["resources"]["cpu"]["capacity"] == pytest.approx(os.cpu_count() - 0.5)


def test_a_bad_config_file_stops_the_start_naming_the_file_and_the_key(tmp_path, etcd_server, docker_host):
    config = tmp_path / "agent.toml"
    config.write_text('namespace = "prod"\nreserved-mem = "lots"\n')
    agent = AgentProcess(tmp_path, etcd_server.addr, agent_id="agent-bad-toml", extra=["--config", str(config)])
    assert agent.failed_start() != 0
    assert f"{config}: reserved-mem: " in agent.log_text(), agent.log_text()[-2000:]
