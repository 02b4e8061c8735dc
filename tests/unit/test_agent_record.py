"""The agent record's resources: capacity, granted use, and the measured use next to them."""

from twisted.internet.task import Clock

from bai_agent.node.capacity import Capacity
from bai_agent.report import MEASURED_MEM_STEP
from tests.agent_parts import AgentParts


class StubStats:
    def __init__(self, node=None):
        self.node = node

    def node_latest(self):
        return self.node


def state(tmp_path, node=None):
    return AgentParts(
        Clock(), tmp_path, agent_id="a1", capacity=Capacity(4.0, 8 << 30, 2), stats=StubStats(node)
    ).report


def test_without_a_sample_the_record_has_capacity_and_grants_only(tmp_path):
    resources = state(tmp_path).record()["resources"]
    assert resources["cpu"] == {"capacity": 4.0, "used": 0}
    assert all("measured" not in amounts for amounts in resources.values())


def test_measured_use_is_in_slot_units_and_rounded(tmp_path):
    node = {
        "cpu": {"count": 4, "percent": 37.3, "per_core": [10, 20, 50, 69.2]},
        "mem": {"total": 8 << 30, "used": (3 << 30) + 1000, "available": 5 << 30},
        "gpus": [{"index": 0, "util_percent": 55}, {"index": 1, "error": "GPU is lost"}],
    }
    resources = state(tmp_path, node).record()["resources"]
    assert resources["cpu"]["measured"] == 1.5  # 37.3% of 4 cores
    assert resources["mem"]["measured"] == 3 << 30
    assert resources["mem"]["measured"] % MEASURED_MEM_STEP == 0
    assert resources["cuda.device"]["measured"] == 0.6


def test_small_changes_in_use_leave_the_record_unchanged(tmp_path):
    node = {"cpu": {"count": 4, "percent": 25.0}, "mem": {"used": 2 << 30}}
    agent = state(tmp_path, node)
    before = agent.record()
    node["cpu"]["percent"] = 25.6
    node["mem"]["used"] = (2 << 30) + (10 << 20)
    assert agent.record() == before


def test_a_broken_sample_section_is_left_out(tmp_path):
    node = {
        "cpu": {"count": 4, "percent": float("nan")},
        "mem": "lots",
        "gpus": [{"index": 0, "util_percent": float("inf")}],
    }
    resources = state(tmp_path, node).record()["resources"]
    assert all("measured" not in amounts for amounts in resources.values())
