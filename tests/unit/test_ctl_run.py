"""
``bai-agent-ctl run`` and ``repl`` without an agent: block gathering, console rendering,
one run driven through its statuses by a scripted client, input and interrupts, the REPL's
prompt loop with a terminal and a reactor bridge that answer at once.
"""

import argparse
import base64
import concurrent.futures
import io
import os
import queue
import signal
import stat

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from bai_agent import ctl
from bai_agent.ctl import run as ctl_run
from bai_agent.ctl.cli import build_parser
from bai_agent.ctl.errors import CtlError
from bai_agent.ctl.output import HTML_NOTE, ConsoleView, OutputDir, render_console
from bai_agent.ctl.repl import (
    CONTINUATION_PROMPT,
    PROMPT,
    CodeBlock,
    Completer,
    Console,
    QueueTerminal,
    ReplSession,
    SessionEnded,
    is_exit_command,
)
from bai_agent.ctl.run import (
    KernelRun,
    LineSource,
    RunResult,
    StreamTerminal,
    read_code,
    split_prompt,
)
from bai_agent.protocol import errors
from bai_agent.protocol.console import parse_item
from bai_agent.testing.deferreds import result_of


def answer(status, console=(), exit_code=None, options=None, run_id="r1"):
    result = {
        "run_id": run_id,
        "status": status,
        "console": [list(e) if isinstance(e, (list, tuple)) else e for e in console],
    }
    if exit_code is not None:
        result["exit_code"] = exit_code
    if options is not None:
        result["options"] = options
    return result


class ScriptedClient:
    """An AgentClient stand-in: ``execute`` answers from a script, in order."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.calls = []
        self.interrupts = 0
        self.interrupt_error = None
        self.created = []
        self.destroyed = []
        self.create_error = None
        self.destroy_error = None
        self.closed = False
        self.disconnected = Deferred()
        self.completions = []

    def execute(self, kernel_id, mode, code="", run_id=None, options=None):
        self.calls.append({"kernel_id": kernel_id, "mode": mode, "code": code, "run_id": run_id, "options": options})
        if not self.answers:
            return fail(AssertionError(f"unexpected Execute {mode} {code!r}"))
        result = self.answers.pop(0)
        if isinstance(result, Deferred):
            return result
        if isinstance(result, BaseException):
            return fail(result)
        return succeed(result)

    def interrupt_kernel(self, kernel_id):
        self.interrupts += 1
        if self.interrupt_error is not None:
            return fail(self.interrupt_error)
        return succeed({})

    def create_kernel(self, kernel_id, image, resources):
        self.created.append((kernel_id, image, resources))
        return fail(self.create_error) if self.create_error else succeed({"kernel_id": kernel_id})

    def destroy_kernel(self, kernel_id):
        self.destroyed.append(kernel_id)
        return fail(self.destroy_error) if self.destroy_error else succeed({"kernel_id": kernel_id})

    def get_completions(self, kernel_id, text):
        self.completion_text = text
        return succeed(self.completions)

    def close(self):
        self.closed = True


class RecordingTerminal:
    def __init__(self, lines=()):
        self.shown = []
        self.asked = []
        self.lines = list(lines)
        self.pending = None

    def show(self, console):
        self.shown.append(console)

    def read_input(self, prompt, is_password):
        self.asked.append((prompt, is_password))
        if self.lines:
            return succeed(self.lines.pop(0))
        self.pending = Deferred()
        return self.pending


# -- blocks of lines ---------------------------------------------------------------------------


def test_a_simple_statement_is_a_block_by_itself():
    block = CodeBlock()
    assert block.prompt == PROMPT
    assert block.push("x = 6*7") == "x = 6*7"
    assert block.prompt == PROMPT


def test_a_compound_statement_goes_on_until_an_empty_line():
    block = CodeBlock()
    assert block.push("for i in range(2):") is None
    assert block.prompt == CONTINUATION_PROMPT
    assert block.push("    print(i)") is None
    assert block.push("") == "for i in range(2):\n    print(i)\n"
    assert block.prompt == PROMPT


def test_one_line_compound_statement_waits_for_the_empty_line_like_python():
    block = CodeBlock()
    assert block.push("while True: pass") is None
    assert block.push("") == "while True: pass\n"


def test_open_brackets_and_strings_continue_until_closed():
    block = CodeBlock()
    assert block.push("f(1,") is None
    assert block.push("  2)") == "f(1,\n  2)"
    assert block.push('s = """a') is None
    assert block.push('b"""') == 's = """a\nb"""'


def test_a_syntax_error_completes_the_block_so_the_kernel_reports_it():
    block = CodeBlock()
    assert block.push("x = = 1") == "x = = 1"
    assert block.push("def f():") is None
    assert block.push("") == "def f():\n"


def test_empty_lines_at_the_prompt_are_skipped():
    block = CodeBlock()
    assert block.push("") is None
    assert block.push("   ") is None
    assert block.prompt == PROMPT


def test_finish_and_reset_drop_or_return_an_unfinished_block():
    block = CodeBlock()
    block.push("if x:")
    block.push("    y = 1")
    assert block.finish() == "if x:\n    y = 1"
    assert block.finish() is None
    block.push("if x:")
    block.reset()
    assert block.prompt == PROMPT


@pytest.mark.parametrize("source", ["exit()", "quit()", " exit ( ) ", "quit", "exit"])
def test_exit_commands(source):
    assert is_exit_command(source)


@pytest.mark.parametrize("source", ["exit(1)", "print(exit)", "exited()", "x = exit"])
def test_other_code_is_not_an_exit_command(source):
    assert not is_exit_command(source)


# -- console entries ---------------------------------------------------------------------------


def test_render_console_keeps_order_and_streams():
    out, err = [], []
    render_console(
        [["stdout", "a\n"], ["stderr", "oops\n"], ["stdout", "b"], ["stdout", ""]],
        lambda text: out.append(("out", text)) or err.append(("out", text)),
        lambda text: err.append(("err", text)),
    )
    assert err == [("out", "a\n"), ("err", "oops\n"), ("out", "b")]


PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff not really a picture"
PNG_ITEM = ["media", ["image/png", base64.b64encode(PNG_BYTES).decode("ascii")]]
SVG_TEXT = '<svg xmlns="http://www.w3.org/2000/svg"><text>\u00e9t\u00e9</text></svg>'


def view_of(output_dir):
    """A ``ConsoleView`` whose stdout and stderr writes go into one list, in order."""
    written = []
    view = ConsoleView(
        lambda text: written.append(("out", text)), lambda text: written.append(("err", text)), OutputDir(output_dir)
    )
    return view, written


def test_a_picture_is_saved_and_its_path_shown_between_the_texts_around_it(tmp_path):
    view, written = view_of(str(tmp_path / "plots"))
    view.show([["stdout", "before\n"], PNG_ITEM, ["stdout", "after\n"]])
    path = os.path.join(str(tmp_path / "plots"), "1.png")
    assert written == [("out", "before\n"), ("out", f"[image/png saved to {path}]\n"), ("out", "after\n")]
    assert (tmp_path / "plots" / "1.png").read_bytes() == PNG_BYTES
    assert stat.S_IMODE(os.stat(tmp_path / "plots").st_mode) == 0o755


def test_numbers_go_on_from_the_highest_file_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "3.png").write_bytes(b"theirs")
    (tmp_path / "7.svg").write_bytes(b"theirs too")
    (tmp_path / "notes.txt").write_text("not numbered")
    output = OutputDir(str(tmp_path))
    assert output.save(parse_item(PNG_ITEM)) == os.path.join(str(tmp_path), "8.png")
    (tmp_path / "9.png").write_bytes(b"made meanwhile")
    (tmp_path / "10.svg").symlink_to(tmp_path / "nowhere")  # O_EXCL: a link counts as taken
    assert output.save(parse_item(PNG_ITEM)) == os.path.join(str(tmp_path), "11.png")
    assert (tmp_path / "3.png").read_bytes() == b"theirs"
    assert (tmp_path / "9.png").read_bytes() == b"made meanwhile"
    assert (tmp_path / "11.png").read_bytes() == PNG_BYTES


def test_a_taken_name_is_skipped_for_the_next_number(tmp_path, monkeypatch):
    output = OutputDir(str(tmp_path))
    monkeypatch.setattr(output, "_highest", lambda: 0)  # as if 1.png came after the scan
    (tmp_path / "1.png").write_bytes(b"theirs")
    assert output.save(parse_item(PNG_ITEM)) == os.path.join(str(tmp_path), "2.png")
    assert (tmp_path / "1.png").read_bytes() == b"theirs"


def test_an_svg_is_saved_as_its_text_with_the_svg_suffix(tmp_path):
    view, written = view_of(str(tmp_path))
    view.show([["media", ["image/svg+xml", SVG_TEXT]]])
    assert written == [("out", f"[image/svg+xml saved to {os.path.join(str(tmp_path), '1.svg')}]\n")]
    assert (tmp_path / "1.svg").read_text(encoding="utf-8") == SVG_TEXT


def test_html_is_printed_as_text_after_a_note(tmp_path):
    view, written = view_of(str(tmp_path))
    view.show([["html", "<table><tr><td>1</td></tr></table>"], ["stdout", "next\n"]])
    assert written == [("out", HTML_NOTE), ("out", "<table><tr><td>1</td></tr></table>\n"), ("out", "next\n")]
    assert HTML_NOTE == "[html, shown as text]\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [["media", ["image/png", "not base64!"]], ["media", ["image/gif", "R0lG"]], ["widget", {}], "stdout", ["stdout"]],
)
def test_a_malformed_item_is_a_note_on_stderr_and_the_rest_is_shown(tmp_path, bad):
    view, written = view_of(str(tmp_path))
    view.show([["stdout", "a\n"], bad, ["stdout", "b\n"], PNG_ITEM])
    assert written[0] == ("out", "a\n")
    assert written[1][0] == "err" and written[1][1].startswith("[console item not shown: ")
    assert written[2:] == [("out", "b\n"), ("out", f"[image/png saved to {os.path.join(str(tmp_path), '1.png')}]\n")]


def test_a_note_starts_a_line_of_its_own_across_answers(tmp_path):
    view, written = view_of(str(tmp_path))
    view.show([["stdout", "50%"]])
    view.show([PNG_ITEM])
    assert written[1] == ("out", f"\n[image/png saved to {os.path.join(str(tmp_path), '1.png')}]\n")


def test_a_picture_that_cannot_be_saved_is_a_note_and_the_rest_is_shown(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    view, written = view_of(str(tmp_path / "file"))
    view.show([PNG_ITEM, ["stdout", "after\n"]])
    assert written[0][0] == "err" and written[0][1].startswith(f"[image/png not saved in {tmp_path / 'file'}: ")
    assert written[1] == ("out", "after\n")


def test_a_console_that_is_not_a_list_is_a_note(tmp_path):
    view, written = view_of(str(tmp_path))
    view.show({"stdout": "x"})
    assert written == [("err", "[console not shown: a list expected, not dict]\n")]


def test_split_prompt_takes_the_unfinished_last_line_of_stdout():
    assert split_prompt([["stdout", "hello\nwho? "]]) == ([["stdout", "hello\n"]], "who? ")
    assert split_prompt([["stderr", "w\n"], ["stdout", "who? "]]) == ([["stderr", "w\n"]], "who? ")
    assert split_prompt([["stdout", "done\n"]]) == ([["stdout", "done\n"]], "")
    assert split_prompt([["stderr", "who? "]]) == ([["stderr", "who? "]], "")
    assert split_prompt([]) == ([], "")


@pytest.mark.parametrize(
    "result, status",
    [
        (RunResult("finished", 0), 0),
        (RunResult("finished", 3), 3),
        (RunResult("finished", None), 0),
        (RunResult("finished", 130), 130),
        (RunResult("finished", 300), 1),
        (RunResult("exec-timeout", 137), 124),
    ],
)
def test_exit_status_of_a_run(result, status):
    assert result.exit_status == status


# -- one run -----------------------------------------------------------------------------------


def test_a_run_shows_each_answer_and_collects_with_continue():
    client = ScriptedClient(
        [
            answer("continued", [["stdout", "1\n"]]),
            answer("continued", []),
            answer("finished", [["stdout", "2\n"], ["stderr", "e\n"]], exit_code=0),
        ]
    )
    terminal = RecordingTerminal()
    result = result_of(KernelRun(client, "k1", terminal, flush_timeout=0.2).start("query", "print(1)"))
    assert result == RunResult("finished", 0)
    assert terminal.shown == [[["stdout", "1\n"]], [], [["stdout", "2\n"], ["stderr", "e\n"]]]
    assert [(call["mode"], call["run_id"], call["options"]) for call in client.calls] == [
        ("query", None, {"flush_timeout": 0.2}),
        ("continue", "r1", {"flush_timeout": 0.2}),
        ("continue", "r1", {"flush_timeout": 0.2}),
    ]
    assert client.calls[0]["code"] == "print(1)"


def test_batch_options_go_with_the_first_call_and_build_finished_is_collected_past():
    client = ScriptedClient(
        [
            answer("build-finished", [["stdout", "built\n"]], exit_code=0),
            answer("finished", [["stdout", "ran\n"]], exit_code=4),
        ]
    )
    terminal = RecordingTerminal()
    result = result_of(KernelRun(client, "k1", terminal).start("batch", "", {"build": "make", "exec": "./a"}))
    assert result.exit_status == 4
    assert client.calls[0]["options"] == {"build": "make", "exec": "./a", "flush_timeout": 0.2}
    assert client.calls[1]["mode"] == "continue"


def test_waiting_input_asks_the_terminal_with_the_prompt_and_sends_the_line():
    client = ScriptedClient(
        [
            answer("waiting-input", [["stdout", "hi\nwho? "]], options={"is_password": False}),
            answer("waiting-input", [["stdout", "pw: "]], options={"is_password": True}),
            answer("finished", [["stdout", "bob\n"]], exit_code=0),
        ]
    )
    terminal = RecordingTerminal(["bob", "secret"])
    result = result_of(KernelRun(client, "k1", terminal).start("query", "..."))
    assert result.exit_code == 0
    assert terminal.asked == [("who? ", False), ("pw: ", True)]
    assert terminal.shown[0] == [["stdout", "hi\n"]]
    assert [(call["mode"], call["code"], call["run_id"]) for call in client.calls[1:]] == [
        ("input", "bob", "r1"),
        ("input", "secret", "r1"),
    ]


def test_interrupt_while_waiting_for_input_cancels_the_read_and_collects_the_end():
    client = ScriptedClient(
        [
            answer("waiting-input", [["stdout", "who? "]], options={"is_password": False}),
            answer("finished", [["stderr", "KeyboardInterrupt\n"]], exit_code=130),
        ]
    )
    terminal = RecordingTerminal()
    run = KernelRun(client, "k1", terminal)
    d = run.start("query", "input('who? ')")
    assert terminal.pending is not None and not d.called
    result_of(run.interrupt())
    assert client.interrupts == 1
    assert result_of(d) == RunResult("finished", 130)
    assert client.calls[-1]["mode"] == "continue"


def test_a_failed_interrupt_leaves_the_input_read_pending():
    client = ScriptedClient([answer("waiting-input", [], options={})])
    client.interrupt_error = errors.KernelNotRunning("nothing runs")
    terminal = RecordingTerminal()
    run = KernelRun(client, "k1", terminal)
    d = run.start("query", "input()")
    with pytest.raises(errors.KernelNotRunning):
        result_of(run.interrupt())
    assert not terminal.pending.called and not d.called


def test_exec_timeout_ends_the_run():
    client = ScriptedClient([answer("continued"), answer("exec-timeout", exit_code=137)])
    result = result_of(KernelRun(client, "k1", RecordingTerminal()).start("query", "while 1: pass"))
    assert result.status == "exec-timeout" and result.exit_status == 124


def test_declared_errors_reach_the_caller():
    client = ScriptedClient([errors.RunConflict("busy")])
    with pytest.raises(errors.RunConflict):
        result_of(KernelRun(client, "k1", RecordingTerminal()).start("query", "1"))


# -- run's terminal ------------------------------------------------------------------------------


class ThreadCalls:
    """``callFromThread`` into a queue that the test runs, like a reactor's thread would."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, function, *args):
        self.calls.put((function, args))

    def run_one(self, timeout=5):
        function, args = self.calls.get(timeout=timeout)
        function(*args)


def test_line_source_reads_in_a_thread_and_keeps_a_line_whose_read_was_cancelled():
    reactor = ThreadCalls()
    lines = LineSource(reactor, lambda: io.StringIO("one\ntwo\nlast"))
    first = lines.read_line()
    reactor.run_one()
    assert result_of(first) == "one"
    cancelled = lines.read_line()
    cancelled.cancel()
    reactor.run_one()
    assert result_of(lines.read_line()) == "two"
    third = lines.read_line()
    reactor.run_one()
    assert result_of(third) == "last"
    end = lines.read_line()
    reactor.run_one()
    assert result_of(end) is None
    assert result_of(lines.read_line()) is None


def test_stream_terminal_shows_output_and_answers_empty_lines_after_the_end():
    reactor = ThreadCalls()
    out, err = io.StringIO(), io.StringIO()
    terminal = StreamTerminal(reactor, out, err, LineSource(reactor, lambda: io.StringIO("bob\n")))
    terminal.show([["stdout", "a\n"], ["stderr", "b\n"]])
    d = terminal.read_input("who? ", False)
    reactor.run_one()
    assert result_of(d) == "bob"
    d = terminal.read_input("again? ", False)
    reactor.run_one()
    assert result_of(d) == ""
    assert result_of(terminal.read_input("", False)) == ""
    assert out.getvalue() == "a\nwho? again? "
    assert err.getvalue().count("no more input") == 1


# -- ctl run's arguments -------------------------------------------------------------------------


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_run_takes_code_from_c_from_a_file_or_from_stdin(tmp_path):
    assert read_code(parse("run", "a", "k", "-c", "print(1)")) == ("query", "print(1)", {})
    source = tmp_path / "code.py"
    source.write_text("print(2)\n")
    assert read_code(parse("run", "a", "k", str(source))) == ("query", "print(2)\n", {})
    assert read_code(parse("run", "a", "k", "-"), io.StringIO("print(3)")) == ("query", "print(3)", {})


def test_batch_mode_takes_build_and_exec():
    assert read_code(parse("run", "a", "k", "--batch", "--build", "make", "--exec", "./a")) == (
        "batch",
        "",
        {"build": "make", "exec": "./a"},
    )
    assert read_code(parse("run", "a", "k", "--batch", "-c", "echo hi")) == ("batch", "echo hi", {})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["file.py", "-c", "1"], "not both"),
        ([], "no code"),
        (["-c", "1", "--exec", "x"], "--batch"),
        (["--batch"], "needs --exec"),
        (["/no/such/file.py"], "cannot read /no/such/file.py"),
        (["-c", "1", "--flush-timeout", "-1"], "flush-timeout"),
    ],
)
def test_bad_run_arguments_are_one_line_errors(argv, message):
    with pytest.raises(CtlError, match=message):
        read_code(parse("run", "a", "k", *argv))


def test_repl_and_interrupt_arguments():
    args = parse("repl", "agent-1", "--image", "img", "--cpu", "0.5", "--mem", "1g", "--kernel-id", "mine")
    assert (args.agent, args.image, args.cpu, args.mem, args.kernel_id) == ("agent-1", "img", 0.5, "1g", "mine")
    assert parse("repl", "agent-1").kernel_id is None
    assert parse("repl", "agent-1").output_dir == "bai-output"
    assert parse("repl", "agent-1", "--output-dir", "plots").output_dir == "plots"
    assert parse("run", "a", "k", "-c", "1").output_dir == "bai-output"
    assert parse("run", "a", "k", "-c", "1", "--output-dir", "plots").output_dir == "plots"
    args = parse("interrupt", "agent-1", "k")
    assert (args.command, args.kernel_id) == ("interrupt", "k")


class ImmediateReactor(Clock):
    def callFromThread(self, function, *args):
        function(*args)


def run_code(client, argv, stdin=""):
    args = parse("run", "a", "k", *argv)
    mode, code, options = read_code(args)
    out, err = io.StringIO(), io.StringIO()
    d = ctl_run.run_code(ImmediateReactor(), client, args, mode, code, options, out, err, io.StringIO(stdin))
    return d, out, err


def test_run_code_prints_and_returns_the_exit_status():
    client = ScriptedClient([answer("finished", [["stdout", "out\n"], ["stderr", "err\n"]], exit_code=3)])
    d, out, err = run_code(client, ["-c", "x"])
    assert result_of(d) == 3
    assert (out.getvalue(), err.getvalue()) == ("out\n", "err\n")


def test_run_code_saves_pictures_in_the_output_dir_and_prints_their_paths_in_order(tmp_path):
    plots = str(tmp_path / "plots")
    client = ScriptedClient(
        [
            answer("continued", [["stdout", "text\n"], PNG_ITEM]),
            answer("finished", [["stdout", "again\n"], ["stderr", "warn\n"], PNG_ITEM], exit_code=0),
        ]
    )
    d, out, err = run_code(client, ["-c", "plot()", "--output-dir", plots])
    assert result_of(d) == 0
    assert out.getvalue() == (f"text\n[image/png saved to {plots}/1.png]\nagain\n[image/png saved to {plots}/2.png]\n")
    assert err.getvalue() == "warn\n"
    assert (tmp_path / "plots" / "1.png").read_bytes() == (tmp_path / "plots" / "2.png").read_bytes() == PNG_BYTES


def test_run_code_saves_in_bai_output_by_default_made_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d, out, _ = run_code(ScriptedClient([answer("finished", [["stdout", "x\n"]], exit_code=0)]), ["-c", "x"])
    assert result_of(d) == 0 and out.getvalue() == "x\n"
    assert not (tmp_path / "bai-output").exists()
    (tmp_path / "bai-output").mkdir()
    (tmp_path / "bai-output" / "4.svg").write_text("<svg/>")
    d, out, _ = run_code(ScriptedClient([answer("finished", [PNG_ITEM], exit_code=0)]), ["-c", "x"])
    assert result_of(d) == 0
    assert out.getvalue() == "[image/png saved to bai-output/5.png]\n"
    assert (tmp_path / "bai-output" / "5.png").read_bytes() == PNG_BYTES


def test_run_code_shows_html_and_goes_past_a_malformed_item(tmp_path):
    client = ScriptedClient(
        [answer("finished", [["html", "<b>x</b>"], ["media", ["image/png", "%%%"]], ["stdout", "end\n"]], exit_code=2)]
    )
    d, out, err = run_code(client, ["-c", "x", "--output-dir", str(tmp_path)])
    assert result_of(d) == 2
    assert out.getvalue() == "[html, shown as text]\n<b>x</b>\nend\n"
    assert err.getvalue().startswith("[console item not shown: image/png data is not base64")
    assert list(tmp_path.iterdir()) == []


def test_malformed_items_before_an_input_prompt_are_passed_on_for_the_terminal_to_report():
    assert split_prompt([["stdout"], 7, ["stdout", "who? "]]) == ([["stdout"], 7], "who? ")
    assert split_prompt([["stdout", "a\n"], ["stdout"]]) == ([["stdout", "a\n"], ["stdout"]], "")
    assert split_prompt([["stdout", "a\n"], 7]) == ([["stdout", "a\n"], 7], "")
    assert split_prompt("who? ") == (["who? "], "")
    assert split_prompt(None) == ([], "")
    client = ScriptedClient(
        [
            answer("waiting-input", [["stdout"], 7, ["stdout", "who? "]], options={}),
            answer("finished", [["stdout", "hi bob\n"]], exit_code=0),
        ]
    )
    terminal = RecordingTerminal(["bob"])
    assert result_of(KernelRun(client, "k1", terminal).start("query", "input('who? ')")).exit_code == 0
    assert terminal.asked == [("who? ", False)]
    assert terminal.shown[0] == [["stdout"], 7]


def test_run_code_says_when_the_exec_timeout_ended_it():
    d, out, err = run_code(ScriptedClient([answer("exec-timeout", exit_code=137)]), ["-c", "x"])
    assert result_of(d) == 124
    assert "exec timeout of kernel k" in err.getvalue()


def test_run_code_reports_a_busy_kernel():
    d, _, _ = run_code(ScriptedClient([errors.RunConflict("run r0 is still active")]), ["-c", "x"])
    with pytest.raises(CtlError, match="busy"):
        result_of(d)


def test_first_ctrl_c_interrupts_the_run_and_the_second_stops_waiting():
    pending = Deferred()
    client = ScriptedClient([answer("continued"), pending])
    before = signal.getsignal(signal.SIGINT)
    d, _, err = run_code(client, ["-c", "while 1: pass"])
    handler = signal.getsignal(signal.SIGINT)
    assert handler is not before
    handler(signal.SIGINT, None)
    assert client.interrupts == 1 and not d.called
    assert "interrupting" in err.getvalue()
    handler(signal.SIGINT, None)
    assert result_of(d) == 130
    assert "stopped waiting" in err.getvalue()
    assert signal.getsignal(signal.SIGINT) is before
    pending.callback(answer("finished", exit_code=130))  # late: nobody waits, nothing breaks


# -- the REPL --------------------------------------------------------------------------------------


class ImmediateBridge:
    """``ReactorThread``'s calls, made at once in this thread."""

    def __init__(self):
        self.reactor = Clock()

    def submit(self, function, *args, **kwargs):
        future = concurrent.futures.Future()
        d = function(*args, **kwargs)
        d = d if isinstance(d, Deferred) else succeed(d)
        d.addCallbacks(future.set_result, lambda failure: future.set_exception(failure.value))
        return future

    def call_soon(self, function, *args):
        function(*args)


class ScriptedIO:
    """A person at the terminal: lines (or exceptions to raise) in order."""

    interactive = True

    def __init__(self, lines):
        self.lines = list(lines)
        self.prompts = []
        self.out = []
        self.err = []

    def read_line(self, prompt, fresh_line=True):
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException) or (isinstance(line, type) and issubclass(line, BaseException)):
            raise line
        return line

    def read_password(self, prompt):
        self.prompts.append(("password", prompt))
        return self.read_line(prompt)

    def write_out(self, text):
        self.out.append(text)

    def write_err(self, text):
        self.err.append(text)


def console(answers, lines, output_dir=None):
    client = ScriptedClient(answers)
    session = ReplSession(Clock(), None, client, "k1")
    output = OutputDir(output_dir) if output_dir is not None else None
    return Console(ImmediateBridge(), session, ScriptedIO(lines), output), client


def test_repl_runs_complete_blocks_and_shows_their_output():
    repl, client = console(
        [
            answer("finished", [["stdout", "42\n"]], exit_code=0),
            answer("finished", [["stdout", "0\n1\n"]], exit_code=0),
        ],
        ["print(6*7)", "for i in range(2):", "    print(i)", ""],
    )
    assert repl.loop() == 0
    assert [call["code"] for call in client.calls] == ["print(6*7)", "for i in range(2):\n    print(i)\n"]
    assert repl.io.out == ["42\n", "0\n1\n", "\n"]
    assert repl.io.prompts == [PROMPT, PROMPT, CONTINUATION_PROMPT, CONTINUATION_PROMPT, PROMPT]


def test_repl_saves_pictures_and_shows_html_in_order_across_blocks(tmp_path):
    plots = tmp_path / "plots"
    repl, _ = console(
        [
            answer("finished", [["stdout", "a\n"], PNG_ITEM, ["stdout", "b\n"]], exit_code=0),
            answer("finished", [["media", ["image/svg+xml", SVG_TEXT]], ["html", "<i>t</i>\n"], ["x"]], exit_code=0),
        ],
        ["plot()", "show()"],
        output_dir=str(plots),
    )
    assert repl.loop() == 0
    assert repl.io.out == [
        "a\n",
        f"[image/png saved to {plots}/1.png]\n",
        "b\n",
        f"[image/svg+xml saved to {plots}/2.svg]\n",
        "[html, shown as text]\n",
        "<i>t</i>\n",
        "\n",
    ]
    assert (plots / "1.png").read_bytes() == PNG_BYTES
    assert (plots / "2.svg").read_text(encoding="utf-8") == SVG_TEXT
    assert len(repl.io.err) == 1 and repl.io.err[0].startswith("[console item not shown: ")


def test_repl_exit_leaves_without_running_it():
    repl, client = console([], ["exit()", "print('never')"])
    assert repl.loop() == 0
    assert client.calls == []


def test_repl_runs_an_unfinished_block_at_the_end_of_input():
    repl, client = console([answer("finished", exit_code=0)], ["if True:", "    x = 1"])
    assert repl.loop() == 0
    assert client.calls[0]["code"] == "if True:\n    x = 1"


def test_ctrl_c_at_the_prompt_drops_the_block():
    repl, client = console([answer("finished", exit_code=0)], ["if True:", KeyboardInterrupt, "x = 2"])
    assert repl.loop() == 0
    assert [call["code"] for call in client.calls] == ["x = 2"]
    assert "KeyboardInterrupt" in "".join(repl.io.err)


def test_repl_answers_input_from_the_person():
    repl, client = console(
        [
            answer("waiting-input", [["stdout", "who? "]], options={"is_password": False}),
            answer("waiting-input", [["stdout", "pw: "]], options={"is_password": True}),
            answer("finished", exit_code=0),
        ],
        ["name = input('who? ')", "bob", "hunter2"],
    )
    assert repl.loop() == 0
    assert [(call["mode"], call["code"]) for call in client.calls[1:]] == [("input", "bob"), ("input", "hunter2")]
    assert repl.io.prompts[1:3] == ["who? ", ("password", "pw: ")]


def test_ctrl_c_while_the_run_waits_for_input_interrupts_it():
    repl, client = console(
        [
            answer("waiting-input", [["stdout", "who? "]], options={"is_password": False}),
            answer("finished", [["stderr", "KeyboardInterrupt\n"]], exit_code=130),
        ],
        ["input('who? ')", KeyboardInterrupt, "exit()"],
    )
    assert repl.loop() == 0
    assert client.interrupts == 1
    assert [call["mode"] for call in client.calls] == ["query", "continue"]
    assert repl.io.err == ["KeyboardInterrupt\n"]


def test_a_busy_kernel_is_reported_and_the_repl_goes_on():
    repl, client = console([errors.RunConflict("busy"), answer("finished", exit_code=0)], ["1", "2"])
    assert repl.loop() == 0
    assert "RunConflict: busy" in "".join(repl.io.err)
    assert len(client.calls) == 2


@pytest.mark.parametrize("error", [errors.KernelNotRunning("it died"), errors.KernelNotFound("idle timeout")])
def test_a_kernel_gone_ends_the_repl(error):
    repl, _ = console([error], ["1", "2"])
    with pytest.raises(SessionEnded, match="not running"):
        repl.loop()


def test_completions_come_from_the_kernel_only_at_the_prompt():
    repl, client = console([], [])
    client.completions = ["os.path", "os.pathsep"]
    assert repl.complete("os.pa") == []
    repl.at_prompt = True
    assert repl.complete("print(os.pa") == ["os.path", "os.pathsep"]
    assert client.completion_text == "print(os.pa"


class FakeReadline:
    def __init__(self, line):
        self.line = line

    def get_line_buffer(self):
        return self.line

    def get_endidx(self):
        return len(self.line)


def test_completer_indents_blank_lines_and_filters_matches():
    assert Completer(FakeReadline("    "), lambda line: ["x"])("", 0) == "    "
    completer = Completer(FakeReadline("print(os.pa"), lambda line: ["os.path", "os.pathsep", "other"])
    assert [completer("os.pa", state) for state in range(4)] == ["os.path", "os.pathsep", None, None]


def test_session_open_creates_and_close_destroys():
    client = ScriptedClient()
    session = result_of(ReplSession.open(Clock(), lambda reactor: succeed(client), "k1", "img", {"cpu": 1}))
    assert client.created == [("k1", "img", {"cpu": 1})]
    result_of(session.close())
    assert client.destroyed == ["k1"] and client.closed


def test_a_failed_creation_is_cleaned_up_but_someone_elses_kernel_is_left():
    client = ScriptedClient()
    client.create_error = errors.KernelCreationFailed("no")
    with pytest.raises(errors.KernelCreationFailed):
        result_of(ReplSession.open(Clock(), lambda reactor: succeed(client), "k1", "img", {}))
    assert client.destroyed == ["k1"]
    client = ScriptedClient()
    client.create_error = errors.KernelExists("taken")
    with pytest.raises(errors.KernelExists):
        result_of(ReplSession.open(Clock(), lambda reactor: succeed(client), "k1", "img", {}))
    assert client.destroyed == [] and client.closed


def test_close_reconnects_when_the_connection_was_lost_and_accepts_a_kernel_already_gone():
    lost, fresh = ScriptedClient(), ScriptedClient()
    lost.disconnected.callback(None)
    fresh.destroy_error = errors.KernelNotFound("gone")
    session = ReplSession(Clock(), lambda reactor: succeed(fresh), lost, "k1")
    result_of(session.close())
    assert (lost.destroyed, fresh.destroyed) == ([], ["k1"])
    assert lost.closed and fresh.closed


def test_interrupt_with_nothing_running_is_no_error():
    client = ScriptedClient()
    client.interrupt_error = errors.KernelNotRunning("idle")
    session = ReplSession(Clock(), None, client, "k1")
    result_of(session.interrupt())
    session.current = KernelRun(client, "k1", RecordingTerminal())
    result_of(session.interrupt())
    assert client.interrupts == 1


def test_queue_terminal_posts_output_and_input_requests():
    events = queue.Queue()
    terminal = QueueTerminal(events)
    terminal.show([])
    terminal.show([["stdout", "x"]])
    d = terminal.read_input("who? ", True)
    assert events.get_nowait() == ("output", [["stdout", "x"]])
    assert events.get_nowait()[:3] == ("input", "who? ", True)
    assert events.empty() and not d.called


def test_ctl_repl_passes_the_connection_and_user_errors(monkeypatch):
    seen = {}

    def fake_main(reactor, args, connect, user_errors=()):
        seen.update(reactor=reactor, args=args, connect=connect, user_errors=user_errors)
        return 3

    monkeypatch.setattr("bai_agent.ctl.repl.main", fake_main)
    with pytest.raises(SystemExit) as exit_info:
        ctl.main(["repl", "agent-1"])
    assert exit_info.value.code == 3
    assert seen["user_errors"] == (CtlError,) and callable(seen["connect"])
    assert isinstance(seen["args"], argparse.Namespace)
    assert hasattr(seen["reactor"], "callFromThread")  # the reactor is handed in
