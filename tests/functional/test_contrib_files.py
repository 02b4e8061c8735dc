"""
The service files in contrib/ as an operator drops them into place: the systemd unit passes
``systemd-analyze verify`` (where systemd is installed; else it at least parses), the
supervisor program parses and runs the same command, both commands are options the agent
accepts, and the Prometheus rules pass ``promtool check rules`` and their own tests
(``promtool test rules``). The checkers themselves are checked to refuse a broken file.
"""

import configparser
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

from bai_agent.config import AgentConfig
from bai_agent.tap import Options

pytestmark = pytest.mark.functional

REPO = pathlib.Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "systemd" / "bai-agent.service"
SUPERVISOR = CONTRIB / "supervisor" / "bai-agent.conf"
RULES = CONTRIB / "prometheus" / "bai-agent-rules.yml"
RULE_TESTS = CONTRIB / "prometheus" / "bai-agent-rules.test.yml"
EXAMPLE = REPO / "docs" / "agent.example.toml"


def parse_unit(text):
    """A systemd unit or a supervisor file, as sections of keys (keys keep their case)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(text)
    return parser


def unit_file(path):
    return parse_unit(path.read_text())


def system_units_dir():
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isfile(os.path.join(candidate, "sysinit.target")):
            return candidate
    return None


def systemd_verify(unit_text, tmp_path):
    """
    What ``systemd-analyze verify`` says of a unit with ``unit_text``, installed in a root
    of its own (``--root``): the system's units beside it, and a stand-in for the program
    its ExecStart names, which this machine need not have.
    """
    root = tmp_path / "root"
    shutil.copytree(system_units_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/bai-agent.service").write_text(unit_text)
    program = root / shlex.split(parse_unit(unit_text)["Service"]["ExecStart"])[0].lstrip("/")
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "bai-agent.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def agent_arguments(command):
    """The options after ``bai-agent`` in a supervisor's command line."""
    argv = shlex.split(command)
    assert argv[0] == "/opt/bai-agent/bin/twist" and "bai-agent" in argv, command
    return argv[argv.index("bai-agent") + 1 :]


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    unit = unit_file(UNIT)
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["Restart"] == "on-failure"
    assert int(unit["Service"]["TimeoutStopSec"]) > AgentConfig().stop_grace_period
    assert unit["Service"]["LimitNOFILE"] == "1048576"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None or system_units_dir() is None:
        return  # no systemd here: parsing is what can be checked
    code, said = systemd_verify(text, tmp_path / "good")
    assert (code, said) == (0, ""), said
    # The check finds a broken unit: a misspelt key.
    code, said = systemd_verify(text.replace("KillSignal=", "KilSignal="), tmp_path / "bad")
    assert "Unknown key" in said and "KilSignal" in said, said


def test_the_supervisor_program_runs_the_same_command():
    program = unit_file(SUPERVISOR)["program:bai-agent"]
    assert program["command"] == unit_file(UNIT)["Service"]["ExecStart"]
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) > AgentConfig().stop_grace_period
    assert program["autorestart"] == "unexpected" and program["exitcodes"] == "0"


def test_the_shipped_command_is_one_the_agent_accepts(tmp_path):
    arguments = agent_arguments(unit_file(UNIT)["Service"]["ExecStart"])
    assert arguments[:2] == ["--config", "/etc/bai-agent/agent.toml"]
    # The example as /etc/bai-agent/agent.toml, with directories this test may make.
    options = Options()
    options.parseOptions(
        ["--config", str(EXAMPLE)]
        + arguments[2:]
        + ["--scratch-root", str(tmp_path / "scratch"), "--state-dir", str(tmp_path / "state")]
    )
    assert options.config.namespace == "local"


def promtool(*args, cwd=None):
    path = shutil.which("promtool")
    assert path, "promtool is not installed (Debian package prometheus; scripts/install-deps --test installs it)"
    result = subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return result.returncode, (result.stdout + result.stderr).strip()


def test_the_alert_rules_pass_promtool_check_rules(tmp_path):
    code, said = promtool("check", "rules", str(RULES))
    assert code == 0, said
    assert "SUCCESS: 10 rules found" in said, said
    # promtool refuses what is wrong: a query that does not parse.
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace('up{job="bai-agent"} == 0', 'up{job="bai-agent" == 0'))
    code, said = promtool("check", "rules", str(broken))
    assert code != 0, said


def test_each_alert_fires_when_it_should_and_not_on_a_healthy_agent(tmp_path):
    code, said = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert code == 0, said
    # The tests would notice a changed threshold.
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("< 0.10", "< 0.01"))
    code, said = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert code != 0 and "BaiAgentScratchDiskNearlyFull" in said, said
