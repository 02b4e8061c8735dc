"""
contrib/prometheus/bai-agent-rules.yml speaks of metrics the agent has: every ``bai_agent_*``
name its alerts use is in ``/metrics`` (of a busy agent), and every alert is tested in
bai-agent-rules.test.yml and explained in docs/operations.md. (promtool's own checks are in
tests/functional/test_contrib_files.py.)
"""

import pathlib
import re

from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_status_metrics import BusyAgent

REPO = pathlib.Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "bai-agent-rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "bai-agent-rules.test.yml"
OPERATIONS = REPO / "docs" / "operations.md"


def alerts():
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.M)


def expressions():
    """The text of every ``expr:`` (folded ones span lines up to the next key)."""
    return re.findall(r"expr: (?:>-\n)?(.*?)\n\s+(?:for|labels):", RULES.read_text(), flags=re.S)


def exposed_names(tmp_path):
    busy = BusyAgent(tmp_path)
    try:
        busy.state.journal.append("kernel-terminated", "k-idle", {"reason": "oom-killed", "exit_code": 137})
        exposition = busy.state.metrics.render().decode()
    finally:
        busy.close()
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def test_the_rules_use_only_metrics_the_agent_exposes(tmp_path):
    used = set(re.findall(r"\bbai_agent_\w+", " ".join(expressions())))
    assert len(used) >= 8, used
    missing = sorted(used - exposed_names(tmp_path))
    assert not missing, f"bai-agent-rules.yml uses metrics /metrics lacks: {', '.join(missing)}"


def test_agent_down_is_the_scrape_jobs_up():
    assert 'up{job="bai-agent"} == 0' in expressions()[alerts().index("BaiAgentDown")]


def test_the_alerts_an_operator_wants_are_there():
    assert {
        "BaiAgentDown",
        "BaiAgentEtcdRegistrationLost",
        "BaiAgentDockerUnreachable",
        "BaiAgentHeartbeatLate",
        "BaiAgentKernelsOOMKilled",
        "BaiAgentScratchDiskNearlyFull",
        "BaiAgentEventJournalGrowing",
    } <= set(alerts())
    assert len(alerts()) == len(set(alerts()))


def test_every_alert_is_tested_and_explained():
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    untested = sorted(set(alerts()) - tested)
    assert not untested, f"bai-agent-rules.test.yml does not test {', '.join(untested)}"
    explained = set(re.findall(r"^#+ .*`(BaiAgent\w+)`", OPERATIONS.read_text(), flags=re.M))
    unexplained = sorted(set(alerts()) - explained)
    assert not unexplained, f"docs/operations.md has no heading for {', '.join(unexplained)}"
