"""Execute on the agent side: statuses, flush timeouts, input, backpressure, bad calls."""

import pytest
from twisted.internet.task import Clock

from bai_agent.kernels import execution
from bai_agent.kernels.execution import ANSWER_AT, BUFFER_LIMIT, ExecutionSession
from bai_agent.protocol import errors
from bai_agent.protocol.arguments import RawJson
from bai_agent.testing.fake_runner import FakeRunnerLink


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def link():
    return FakeRunnerLink("/run/x.sock")


@pytest.fixture
def session(clock, link):
    return ExecutionSession("k1", link, clock, exec_timeout=0)


def answer_of(d):
    results = []

    def keep(result):
        if isinstance(result, dict) and isinstance(result.get("console"), RawJson):
            result = dict(result, console=result["console"].value())
        results.append(result)
        return None if hasattr(result, "raiseException") else result

    d.addBoth(keep)
    if not results:
        return None
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def runner(session, run_id, *messages):
    for message in messages:
        message = dict(message)
        message.setdefault("run_id", run_id)
        session.handle(message)


def out(data, stream="stdout"):
    return {"type": "output", "stream": stream, "data": data}


def test_query_sends_execute_and_answers_at_finished(session, link):
    d = session.execute("query", "print(1)", run_id="r1")
    assert link.sent[-1] == {"type": "execute", "run_id": "r1", "mode": "query", "code": "print(1)"}
    assert answer_of(d) is None
    runner(session, "r1", out("1\n"), {"type": "finished", "exit_code": 0})
    assert answer_of(d) == {"run_id": "r1", "status": "finished", "exit_code": 0, "console": [["stdout", "1\n"]]}


def test_stdout_and_stderr_keep_their_order_and_join_runs(session):
    d = session.execute("query", "x", run_id="r1")
    runner(session, "r1", out("a"), out("b"), out("E", "stderr"), out("c"), {"type": "finished", "exit_code": 0})
    assert answer_of(d)["console"] == [["stdout", "ab"], ["stderr", "E"], ["stdout", "c"]]


def test_flush_timeout_answers_continued_and_continue_collects_the_rest(session, clock):
    d = session.execute("query", "x", run_id="r1", options={"flush_timeout": 0.5})
    runner(session, "r1", out("part1"))
    clock.advance(0.5)
    assert answer_of(d) == {"run_id": "r1", "status": "continued", "console": [["stdout", "part1"]]}
    d = session.execute("continue", "", run_id="r1")
    runner(session, "r1", out("part2"), {"type": "finished", "exit_code": 0})
    assert answer_of(d)["console"] == [["stdout", "part2"]]
    assert answer_of(d)["status"] == "finished"
    assert clock.getDelayedCalls() == []


def test_batch_reports_build_finished_then_exec_output(session, link):
    d = session.execute("batch", "", run_id="b1", options={"build": "make", "exec": "./run"})
    assert link.sent[-1]["options"] == {"build": "make", "exec": "./run"}
    runner(
        session,
        "b1",
        out("compiling\n"),
        {"type": "build-finished", "exit_code": 0},
        out("running\n"),
        {"type": "finished", "exit_code": 5},
    )
    first = answer_of(d)
    assert (first["status"], first["exit_code"], first["console"]) == ("build-finished", 0, [["stdout", "compiling\n"]])
    second = answer_of(session.execute("continue", "", run_id="b1"))
    assert (second["status"], second["exit_code"], second["console"]) == ("finished", 5, [["stdout", "running\n"]])


def test_input_round_trip_with_password_flag(session, link):
    d = session.execute("query", "getpass()", run_id="r1")
    runner(session, "r1", {"type": "waiting-input", "prompt": "Password: ", "is_password": True})
    waiting = answer_of(d)
    assert waiting["status"] == "waiting-input"
    assert waiting["options"] == {"is_password": True}
    assert waiting["console"] == [["stdout", "Password: "]]
    d = session.execute("input", "hunter2", run_id="r1")
    assert link.sent[-1] == {"type": "input", "run_id": "r1", "data": "hunter2"}
    runner(session, "r1", {"type": "finished", "exit_code": 0})
    assert answer_of(d)["status"] == "finished"


def test_one_run_at_a_time(session):
    session.execute("query", "loop", run_id="r1", options={"flush_timeout": 0})
    with pytest.raises(errors.RunConflict):
        session.execute("query", "other", run_id="r2")
    runner(session, "r1", {"type": "finished", "exit_code": 0})
    # Finished: a new run may start, even though nobody collected the old one's status.
    session.execute("query", "next", run_id="r3")


def test_a_continue_takes_over_from_a_call_still_waiting(session):
    first = session.execute("query", "loop", run_id="r1")
    runner(session, "r1", out("early"))
    second = session.execute("continue", "", run_id="r1")
    assert answer_of(first) == {"run_id": "r1", "status": "continued", "console": [["stdout", "early"]]}
    runner(session, "r1", out("late"), {"type": "finished", "exit_code": 0})
    assert answer_of(second)["console"] == [["stdout", "late"]]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.execute("query", "x" * ((1 << 20) + 1)),
        lambda s: s.execute("evaluate", "1"),
        lambda s: s.execute("input", "x"),
        lambda s: s.execute("continue", ""),
        lambda s: s.execute("query", "1", run_id="bad id!"),
        lambda s: s.execute("query", "1", options={"flush_timeout": -1}),
        lambda s: s.execute("query", "1", options={"flush_timeout": float("nan")}),
        lambda s: s.execute("query", "1", options=["x"]),
        lambda s: s.execute("batch", "", options={"build": 42}),
    ],
)
def test_bad_calls_are_invalid_request(session, call):
    with pytest.raises(errors.InvalidRequest):
        call(session)


def test_continue_or_input_with_a_wrong_run_id_is_invalid(session, clock):
    session.execute("query", "x", run_id="r1", options={"flush_timeout": 0})
    clock.advance(0)
    with pytest.raises(errors.InvalidRequest, match="not the active run"):
        session.execute("continue", "", run_id="r2")
    with pytest.raises(errors.InvalidRequest, match="not waiting for input"):
        session.execute("input", "data", run_id="r1")


def test_a_waiting_call_is_answered_early_and_a_full_buffer_pauses_the_runner(session, link):
    d = session.execute("query", "flood", run_id="r1", options={"flush_timeout": 60})
    chunk = "x" * 65536
    for _ in range(ANSWER_AT // len(chunk)):
        runner(session, "r1", out(chunk))
    first = answer_of(d)
    assert first["status"] == "continued"
    assert sum(len(data) for _, data in first["console"]) == ANSWER_AT
    assert link.paused is False
    # Without a waiting call the buffer fills and reading stops until someone collects.
    for _ in range(BUFFER_LIMIT // len(chunk)):
        runner(session, "r1", out(chunk))
    assert link.paused is True
    second = answer_of(session.execute("continue", "", run_id="r1"))
    assert sum(len(data) for _, data in second["console"]) == BUFFER_LIMIT
    assert link.paused is False  # collected, so reading resumed


def test_exec_timeout_cancels_the_run_and_says_so(clock, link):
    session = ExecutionSession("k1", link, clock, exec_timeout=5)
    d = session.execute("query", "while True: pass", run_id="r1", options={"flush_timeout": 60})
    clock.advance(5)
    assert link.sent[-1] == {"type": "cancel", "run_id": "r1"}
    runner(session, "r1", {"type": "finished", "exit_code": 137})
    answer = answer_of(d)
    assert (answer["status"], answer["exit_code"]) == ("exec-timeout", 137)


def test_a_dead_runner_fails_the_waiting_call_and_later_ones(session, link):
    d = session.execute("query", "x", run_id="r1")
    link.close("connection lost")
    with pytest.raises(errors.KernelNotRunning):
        answer_of(d)
    with pytest.raises(errors.KernelNotRunning):
        session.execute("query", "y")


def test_messages_of_a_discarded_run_are_ignored(session, clock):
    session.execute("query", "x", run_id="r1", options={"flush_timeout": 0})
    clock.advance(0)
    runner(session, "r1", {"type": "finished", "exit_code": 0})
    d = session.execute("query", "y", run_id="r2")
    runner(session, "r1", out("stale"))
    runner(session, "r2", out("fresh"), {"type": "finished", "exit_code": 0})
    assert answer_of(d)["console"] == [["stdout", "fresh"]]


def test_runner_refusal_finishes_the_run_with_the_reason(session):
    d = session.execute("query", "1", run_id="r1")
    runner(session, "r1", {"type": "error", "code": "NOT_SUPPORTED", "message": "query needs a python runtime"})
    answer = answer_of(d)
    assert answer["status"] == "finished" and answer["exit_code"] == 1
    assert "NOT_SUPPORTED" in answer["console"][0][1]


def test_interrupt_with_nothing_running_is_kernel_not_running(session):
    with pytest.raises(errors.KernelNotRunning):
        answer_of(session.interrupt())


def test_constants_are_what_the_protocol_says():
    assert execution.MAX_CODE_BYTES == 1 << 20
    assert execution.DEFAULT_FLUSH_TIMEOUT == 2.0


# -- rich items (PROTOCOL.md section 10) -----------------------------------------------------


def rich(item):
    return {"type": "rich", "item": item}


PNG_B64 = "iVBORw0KGgo="  # the PNG signature, base64


def test_rich_items_are_entries_of_their_own_in_order(session):
    d = session.execute("query", "x", run_id="r1")
    runner(
        session,
        "r1",
        out("a"),
        out("b"),
        rich(["html", '<table>"\u00e9"\n</table>']),
        out("c"),
        rich(["media", ["image/png", PNG_B64]]),
        rich(["media", ["image/svg+xml", "<svg/>"]]),
        out("E", "stderr"),
        {"type": "finished", "exit_code": 0},
    )
    answer = answer_of(d)
    assert answer["console"] == [
        ["stdout", "ab"],
        ["html", '<table>"\u00e9"\n</table>'],
        ["stdout", "c"],
        ["media", ["image/png", PNG_B64]],
        ["media", ["image/svg+xml", "<svg/>"]],
        ["stderr", "E"],
    ]


def test_the_console_with_rich_items_is_valid_json_that_parse_console_takes(session):
    import json

    from bai_agent.protocol import console

    d = session.execute("query", "x", run_id="r1")
    html = '<p>\\ " \u2028 \x00 \ud800</p>'  # escapes, a control character, a lone surrogate
    runner(session, "r1", rich(["html", html]), out("x"), {"type": "finished", "exit_code": 0})
    results = []
    d.addCallback(results.append)
    raw = results[0]["console"].data
    items = console.parse_console(json.loads(raw))
    assert isinstance(items[0], console.Html) and items[0].text.startswith('<p>\\ " \u2028 \x00 ')
    assert items[1] == console.Output("stdout", "x")


@pytest.mark.parametrize(
    "item",
    [
        None,
        "html",
        ["html"],
        ["html", 3],
        ["html", "a", "b"],
        ["stdout", "not a rich item"],
        ["media", "image/png"],
        ["media", ["image/gif", "R0lGOD=="]],
        ["media", ["image/png", "not base64!"]],
        ["media", ["image/png", 12]],
        ["javascript", "alert(1)"],
        {"html": "x"},
    ],
)
def test_a_malformed_rich_item_becomes_a_note_on_stderr(session, item):
    d = session.execute("query", "x", run_id="r1")
    runner(session, "r1", out("a"), rich(item), out("b"), {"type": "finished", "exit_code": 0})
    console = answer_of(d)["console"]
    assert console[0] == ["stdout", "a"]
    assert console[1][0] == "stderr" and "malformed rich output item" in console[1][1]
    assert console[2] == ["stdout", "b"]
    assert len(console) == 3


def test_a_rich_message_without_item_is_a_note_too(session):
    d = session.execute("query", "x", run_id="r1")
    runner(session, "r1", {"type": "rich"}, {"type": "finished", "exit_code": 0})
    console = answer_of(d)["console"]
    assert [entry[0] for entry in console] == ["stderr"]


def test_batch_runs_take_no_rich_items(session):
    d = session.execute("batch", "echo", run_id="r1")
    runner(session, "r1", rich(["html", "<b>"]), {"type": "finished", "exit_code": 0})
    console = answer_of(d)["console"]
    assert console[0][0] == "stderr" and "batch" in console[0][1]


def test_rich_items_count_towards_the_buffer_limit(session, link):
    d = session.execute("query", "x", run_id="r1", options={"flush_timeout": 300})
    big = "A" * (BUFFER_LIMIT // 2)
    runner(session, "r1", rich(["media", ["image/png", big]]))
    assert answer_of(d)["status"] == "continued"  # over ANSWER_AT: answered at once
    assert answer_of(d)["console"] == [["media", ["image/png", big]]]
    runner(session, "r1", rich(["media", ["image/png", big]]), rich(["media", ["image/png", big]]))
    assert link.paused  # nobody collects: the runner is no longer read
    d = session.execute("continue", "", run_id="r1", options={"flush_timeout": 300})
    assert len(answer_of(d)["console"]) == 2
    assert not link.paused


def test_a_rich_item_of_a_discarded_run_is_ignored(session):
    d = session.execute("query", "x", run_id="r1")
    runner(session, "old", rich(["html", "<b>"]))
    runner(session, "r1", {"type": "finished", "exit_code": 0})
    assert answer_of(d)["console"] == []
