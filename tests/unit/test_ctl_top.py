"""
``bai-agent-ctl top`` without an agent (the table, its order, one view and the live views on
a Clock, a scripted client), and the friendly errors of ``bai-agent-ctl``: a run of a file
that does not exist, an agent that is not registered, help texts in plain text.
"""

import argparse
import io
import json

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock

from bai_agent.ctl.cli import build_parser
from bai_agent.ctl.connection import find_address
from bai_agent.ctl.errors import CtlError
from bai_agent.ctl.run import read_code
from bai_agent.ctl.top import CLEAR, KernelRow, age, busiest_first, fetch_rows, render_top, size, top
from bai_agent.protocol import errors
from bai_agent.testing.deferreds import failure_of, result_of

NOW = 1_700_000_000.0
GIB = 1 << 30


def record(kernel_id, cpu=1, mem=GIB, status="running", created_at=NOW - 90, image="bai-kernel/python:3.11"):
    return {
        "kernel_id": kernel_id,
        "image": image,
        "status": status,
        "created_at": created_at,
        "resources": {"cpu": cpu, "mem": mem},
    }


def sample(cpu_util, mem_bytes, pids=3):
    return {"cpu_util": cpu_util, "mem_bytes": mem_bytes, "pids": pids, "sampled_at": NOW}


class ScriptedClient:
    """ListKernels and GetKernelStats answered from dicts; a stats answer may be an exception."""

    def __init__(self, records, stats):
        self.records = records
        self.stats = stats
        self.calls = 0

    def list_kernels(self):
        self.calls += 1
        return succeed(list(self.records))

    def get_kernel_stats(self, kernel_id):
        answer = self.stats[kernel_id]
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


def table_lines(text):
    return text.splitlines()[2:]


def test_the_table_is_sorted_by_cpu_with_memory_status_and_age():
    rows = [
        KernelRow.of(record("idle", cpu=0.5, mem=512 << 20), sample(0.0, 20 << 20, pids=1)),
        KernelRow.of(record("train", cpu=2, mem=4 * GIB, created_at=NOW - 7500), sample(150.0, 3 * GIB, pids=12)),
        KernelRow.of(record("web", status="creating"), None),
        KernelRow.of(record("etl", cpu=1, mem=GIB, created_at=NOW - 3 * 86400), sample(42.25, 256 << 20)),
    ]
    text = render_top("node-1", rows, NOW, footer="every 2 s, Ctrl-C to quit")
    summary, blank, header, *lines = text.splitlines()
    assert summary == (
        "node-1: 4 kernel(s), 1.92 cores busy, 3.3GiB of memory in use, at 22:13:20 UTC  every 2 s, Ctrl-C to quit"
    )
    assert blank == ""
    assert header.split() == ["KERNEL", "STATUS", "CPU", "%", "CORES", "MEM", "MEM", "%", "PIDS", "AGE", "IMAGE"]
    assert [line.split()[0] for line in lines] == ["train", "etl", "idle", "web"]
    assert lines[0].split() == ["train", "running", "150.0%", "1.5/2", "3.0GiB/4.0GiB", "75.0%", "12", "2h05m"] + [
        "bai-kernel/python:3.11"
    ]
    assert lines[1].split()[2:8] == ["42.2%", "0.42/1", "256MiB/1.0GiB", "25.0%", "3", "3d00h"]
    assert lines[2].split()[2:8] == ["0.0%", "0/0.5", "20MiB/512MiB", "3.9%", "1", "1m"]
    assert lines[3].split()[1:8] == ["creating", "-", "-/1", "-/1.0GiB", "-", "-", "1m"]
    # Columns line up: each column starts at the same place on every line.
    starts = [header.index("STATUS"), header.index("IMAGE")]
    for line in lines:
        assert line[starts[0] - 2 : starts[0]] == "  " and line[starts[1] - 2 : starts[1]] == "  ", line


def test_no_kernels_is_said():
    assert render_top("node-1", [], NOW).splitlines()[2:] == ["no kernels"]


def test_ties_are_broken_by_memory_then_id():
    rows = [KernelRow.of(record(name), sample(10.0, mem)) for name, mem in (("b", 1), ("a", 1), ("c", 5))]
    assert [row.kernel_id for row in busiest_first(rows)] == ["c", "a", "b"]


@pytest.mark.parametrize(
    "value, shown",
    [(None, "-"), (0, "0B"), (512, "512B"), (2048, "2.0KiB"), (3.5 * (1 << 20), "3.5MiB"), (12 * GIB, "12GiB")],
)
def test_sizes(value, shown):
    assert size(value) == shown


@pytest.mark.parametrize(
    "seconds, shown",
    [(None, "-"), (-3, "0s"), (45, "45s"), (720, "12m"), (3 * 3600 + 240, "3h04m"), (2 * 86400 + 3 * 3600, "2d03h")],
)
def test_ages(seconds, shown):
    assert age(seconds) == shown


def test_a_kernel_that_ended_meanwhile_is_left_out_and_one_not_running_has_no_reading():
    client = ScriptedClient(
        [record("gone"), record("new", status="creating"), record("ok")],
        {"gone": errors.KernelNotFound("gone"), "new": errors.KernelNotRunning("new"), "ok": sample(5.0, GIB)},
    )
    rows = result_of(fetch_rows(client))
    assert [(row.kernel_id, row.cpu_percent) for row in rows] == [("new", None), ("ok", 5.0)]


def test_a_lost_connection_is_reported_as_itself():
    client = ScriptedClient([record("a")], {"a": ConnectionLost("gone")})
    failure_of(fetch_rows(client), ConnectionLost)


def args(once, interval=2.0):
    return argparse.Namespace(agent="node-1", once=once, interval=interval)


def test_once_prints_one_table():
    clock = Clock()
    clock.advance(NOW)
    client = ScriptedClient([record("a")], {"a": sample(50.0, GIB)})
    out = io.StringIO()
    assert result_of(top(clock, client, args(once=True), out)) is None
    assert out.getvalue() == render_top("node-1", [KernelRow.of(record("a"), sample(50.0, GIB))], NOW)
    assert client.calls == 1 and not clock.getDelayedCalls()


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_live_views_come_every_interval_and_replace_each_other_on_a_terminal():
    clock = Clock()
    clock.advance(NOW)
    client = ScriptedClient([record("a")], {"a": sample(50.0, GIB)})
    out = Tty()
    d = top(clock, client, args(once=False), out)
    assert client.calls == 1
    clock.advance(1.9)
    assert client.calls == 1
    clock.advance(0.1)
    assert client.calls == 2
    views = out.getvalue().split(CLEAR)
    assert views[0] == "" and len(views) == 3
    assert views[2].startswith("node-1: 1 kernel(s), 0.5 cores busy") and "Ctrl-C to quit" in views[2]
    assert not d.called  # until Ctrl-C stops the reactor
    d.cancel()


def test_live_views_into_a_pipe_follow_each_other():
    clock = Clock()
    clock.advance(NOW)
    out = io.StringIO()
    d = top(clock, ScriptedClient([], {}), args(once=False, interval=5), out)
    clock.advance(5)
    assert CLEAR not in out.getvalue()
    assert out.getvalue().count("no kernels") == 2 and "\n\nnode-1" in out.getvalue()
    d.cancel()


def test_top_parses_its_options():
    parsed = build_parser().parse_args(["top", "node-1", "--once"])
    assert (parsed.command, parsed.agent, parsed.once, parsed.interval) == ("top", "node-1", True, 2.0)
    assert build_parser().parse_args(["top", "node-1", "--interval", "0.5"]).interval == 0.5


# -- friendly errors ---------------------------------------------------------------------------


def run_args(file):
    return build_parser().parse_args(["run", "node-1", "k1", file])


def test_a_run_of_a_file_that_does_not_exist_suggests_dash_c(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CtlError) as raised:
        read_code(run_args("print(1)"))
    assert str(raised.value) == (
        "cannot read print(1): no such file; to run code given on the command line, use -c: -c 'print(1)'"
    )


class AgentsEtcd:
    def __init__(self, *agent_ids):
        self.agents = {
            f"/bai/ns/agents/{agent_id}".encode(): json.dumps({"agent_id": agent_id}).encode() for agent_id in agent_ids
        }

    def get_prefix(self, prefix):
        return succeed(dict(self.agents))


def address_args(agent):
    return argparse.Namespace(agent=agent, namespace="ns", etcd_addr="10.0.0.5:2379")


def test_an_unknown_agent_lists_the_known_ones():
    failure = failure_of(find_address(address_args("node-9"), AgentsEtcd("node-2", "node-1")), CtlError)
    assert str(failure.value) == "no agent 'node-9' in namespace 'ns'; the agents there: node-1, node-2"


def test_an_unknown_agent_in_an_empty_namespace_asks_about_etcd_and_the_namespace():
    failure = failure_of(find_address(address_args("node-9"), AgentsEtcd()), CtlError)
    assert str(failure.value) == (
        "no agent 'node-9' in namespace 'ns'; no agent is registered there "
        "(is --etcd-addr 10.0.0.5:2379 right, and --namespace?)"
    )


def all_parsers():
    parser = build_parser()
    yield "bai-agent-ctl", parser
    for action in parser._subparsers._group_actions:
        yield from action.choices.items()


@pytest.mark.parametrize("name, parser", list(all_parsers()), ids=[name for name, _ in all_parsers()])
def test_help_is_plain_text(name, parser):
    text = parser.format_help()
    for markup in ("``", "`", ":class:", ":func:", ":meth:", "**"):
        assert markup not in text, f"{name} --help has {markup!r}:\n{text}"
