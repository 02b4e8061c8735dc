"""
The runner as a real process on the host, driven over its socket by a small blocking
client: the wire protocol, query and batch runs, input, interrupts, crashes, flow
control, reconnection, and what user code must not be able to do.

User code runs as uid 1000 (the kernel user) when the tests run as root, else as the
current user. The runner directory is copied alone to a temporary place, as it is
mounted alone in containers, so that nothing outside it can be imported by accident.
"""

import ast
import json
import os
import signal
import stat
import struct
import sys
import time

import pytest
import pytest_twisted

import bai_agent.runner
from bai_agent.kernels.runner_link import RunnerLink, connect_runner
from tests.functional.runner_process import (
    RUNNER_MODULES,
    USER_GID,
    USER_UID,
    Client,
    RunnerProcess,
)

pytestmark = pytest.mark.functional


@pytest.fixture
def client(runner):
    c = Client(runner.socket_path)
    yield c
    c.close()


# -- the runner directory itself -----------------------------------------------------------


@pytest.mark.parametrize("name", RUNNER_MODULES)
def test_runner_modules_are_python_3_8_and_standard_library_only(name):
    with open(os.path.join(bai_agent.runner.RUNNER_DIR, name), encoding="utf-8") as f:
        tree = ast.parse(f.read(), name, feature_version=(3, 8))
    siblings = {module[:-3] for module in RUNNER_MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for module in names:
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or top in siblings, f"{name} imports {module}"


# -- handshake and keepalive ----------------------------------------------------------------


def test_hello_comes_first_and_describes_the_runner(runner):
    c = Client(runner.socket_path, handshake=False)
    hello = c.recv()
    assert hello["type"] == "hello"
    assert hello["protocol"] == 1
    assert hello["pid"] == runner.pid
    assert hello["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert hello["runner_version"]
    assert set(hello["features"]) >= {"query", "batch", "user-input", "complete", "interrupt"}
    assert hello["active_run"] is None
    c.send({"type": "hello", "protocol": 1})
    c.send({"type": "ping", "id": 7})
    assert c.recv() == {"type": "pong", "id": 7}


def test_socket_is_private_to_root(runner):
    mode = os.stat(runner.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_protocol_mismatch_is_an_error_then_the_connection_closes(runner):
    c = Client(runner.socket_path, handshake=False)
    c.recv()
    c.send({"type": "hello", "protocol": 2})
    error = c.recv()
    assert (error["type"], error["code"]) == ("error", "PROTOCOL_MISMATCH")
    assert c.is_closed()
    assert Client(runner.socket_path).run("print('still here')").stdout == "still here\n"


def test_first_message_must_be_hello(runner):
    c = Client(runner.socket_path, handshake=False)
    c.recv()
    c.send({"type": "execute", "run_id": "r", "mode": "query", "code": "1"})
    assert c.recv()["code"] == "PROTOCOL_ERROR"
    assert c.is_closed()


def test_pong_comes_at_once_while_user_code_runs(client):
    run_id = client.start("while True: pass")
    time.sleep(0.3)
    for ping_id in range(3):
        sent = time.monotonic()
        client.send({"type": "ping", "id": ping_id})
        assert client.recv(timeout=2) == {"type": "pong", "id": ping_id}
        assert time.monotonic() - sent < 0.5
    client.send({"type": "cancel", "run_id": run_id})
    assert client.collect(run_id).exit_code == 137


def test_unknown_messages_are_answered_with_an_error(client):
    client.send({"type": "frobnicate"})
    assert client.recv()["code"] == "UNKNOWN_MESSAGE"
    client.send({"type": "execute", "run_id": "r", "mode": "sideways", "code": ""})
    assert client.recv()["code"] == "BAD_REQUEST"


# -- query runs ---------------------------------------------------------------------------


def test_query_runs_keep_their_globals(client):
    assert client.run("x = 1").exit_code == 0
    result = client.run("print(x)")
    assert (result.stdout, result.exit_code) == ("1\n", 0)


def test_a_last_expression_is_shown_like_the_repl_does(client):
    assert client.run("x = 41\nx + 1").stdout == "42\n"
    assert client.run("'text'").stdout == "'text'\n"
    assert client.run("None").stdout == ""
    assert client.run("y = 2").stdout == ""
    assert client.run("for i in range(2): i").stdout == ""
    assert client.run("_").stdout == "'text'\n"  # sys.displayhook sets _


def test_stdout_and_stderr_keep_their_relative_order(client):
    result = client.run("import sys\nprint(1)\nprint(2, file=sys.stderr)\nprint(3)")
    assert result.outputs == [("stdout", "1\n"), ("stderr", "2\n"), ("stdout", "3\n")]


def test_small_writes_are_coalesced(client):
    result = client.run("for i in range(10000): print(i)")
    assert result.stdout == "".join(f"{i}\n" for i in range(10000))
    assert len(result.outputs) < 50


def test_threads_and_signal_handlers_printing_at_once_keep_the_channel_whole(client):
    result = client.run(
        "import signal, sys, threading\n"
        "signal.signal(signal.SIGALRM, lambda *a: sys.stdout.write('tick\\n'))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
        "def chatter():\n"
        "    for i in range(20000): sys.stdout.write('t %d\\n' % i)\n"
        "thread = threading.Thread(target=chatter)\n"
        "thread.start()\n"
        "for i in range(20000): sys.stdout.write('m %d\\n' % i)\n"
        "thread.join()\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "print('done')"
    )
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("m ")] == [f"m {i}" for i in range(20000)]
    assert [line for line in lines if line.startswith("t ")] == [f"t {i}" for i in range(20000)]
    assert set(lines) - {f"m {i}" for i in range(20000)} - {f"t {i}" for i in range(20000)} <= {
        "tick",
        "done",
    }
    assert lines[-1] == "done"
    assert client.run("print('channel intact')").stdout == "channel intact\n"


def test_output_written_to_fds_by_subprocesses_arrives(client):
    result = client.run(
        "import os, subprocess, sys\n"
        "os.write(1, b'raw out\\n')\n"
        "os.write(2, b'raw err\\n')\n"
        "subprocess.run(['/bin/sh', '-c', 'echo from-child'])\n"
        "subprocess.run(['/bin/sh', '-c', 'echo to-stderr >&2'], stdout=sys.stdout)\n"
        "n = sys.stdout.buffer.write(b'via buffer\\n')"
    )
    assert result.exit_code == 0
    assert sorted(result.stdout.splitlines()) == ["from-child", "raw out", "via buffer"]
    assert sorted(result.stderr.splitlines()) == ["raw err", "to-stderr"]


def test_invalid_utf8_from_user_code_is_replaced_not_fatal(client):
    result = client.run("import os\nos.write(1, b'a\\xff\\xfeb\\n')\nprint('\\udc80')")
    assert result.exit_code == 0
    assert "a\ufffd\ufffdb\n" in result.stdout


def test_an_exception_prints_the_user_traceback_and_exits_1(client):
    result = client.run("def f():\n    return 1 / 0\n\nf()")
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert 'File "<input-1>", line 4, in <module>' in result.stderr
    assert "return 1 / 0" in result.stderr
    assert result.stderr.endswith("ZeroDivisionError: division by zero\n")
    assert "query.py" not in result.stderr
    assert client.run("print('next')").stdout == "next\n"


def test_a_syntax_error_exits_1(client):
    result = client.run("x = (")
    assert result.exit_code == 1
    assert "SyntaxError" in result.stderr
    assert "query.py" not in result.stderr


def test_system_exit_ends_the_run_with_its_code_and_keeps_the_interpreter(client):
    client.run("kept = 'yes'")
    assert client.run("import sys; sys.exit(3)").exit_code == 3
    assert client.run("raise SystemExit").exit_code == 0
    assert client.run("print(kept)").stdout == "yes\n"


def test_interpreter_exit_ends_the_run_and_a_fresh_interpreter_serves_the_next(client):
    client.run("x = 1")
    result = client.run("import os; os._exit(3)")
    assert result.exit_code == 3
    assert "interpreter died (exit code 3)" in result.stderr
    result = client.run("print('x' in globals())")
    assert (result.stdout, result.exit_code) == ("False\n", 0)


def test_a_segfault_is_survived(client):
    result = client.run("import ctypes; ctypes.string_at(0)")
    assert result.exit_code == 128 + signal.SIGSEGV
    assert "Segmentation fault" in result.stderr  # faulthandler, from the raw stderr
    assert "interpreter died (signal 11 (SIGSEGV))" in result.stderr
    assert client.run("print(6 * 7)").stdout == "42\n"


def test_user_code_runs_as_the_user_in_the_home(runner, client):
    result = client.run("import os\n(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(), os.environ['HOME'])")
    uid, gid, groups, cwd, home = ast.literal_eval(result.stdout)
    assert (uid, gid, cwd, home) == (USER_UID, USER_GID, runner.home, runner.home)
    if os.geteuid() == 0:
        assert groups == []  # root's supplementary groups are dropped


def test_user_modules_in_the_home_are_importable_and_runner_modules_are_not(runner, client):
    with open(os.path.join(runner.home, "mymod.py"), "w") as f:
        f.write("VALUE = 5\n")
    assert client.run("import mymod; print(mymod.VALUE)").stdout == "5\n"
    result = client.run("import framing")
    assert "ModuleNotFoundError" in result.stderr


# -- input -------------------------------------------------------------------------------------


def test_input_round_trip(client):
    run_id = client.start("name = input('name? ')\nprint('hello', name)")
    result = client.collect(run_id, until=("waiting-input",))
    assert result.messages[-1] == {
        "type": "waiting-input",
        "run_id": run_id,
        "prompt": "name? ",
        "is_password": False,
    }
    client.send({"type": "input", "run_id": run_id, "data": "bob"})
    result = client.collect(run_id)
    assert (result.stdout, result.exit_code) == ("hello bob\n", 0)


def test_getpass_round_trip_says_it_is_a_password(client):
    run_id = client.start("import getpass\nsecret = getpass.getpass()\nprint(len(secret))")
    waiting = client.collect(run_id, until=("waiting-input",)).messages[-1]
    assert (waiting["prompt"], waiting["is_password"]) == ("Password: ", True)
    client.send({"type": "input", "run_id": run_id, "data": "s3cret"})
    assert client.collect(run_id).stdout == "6\n"


def test_stdin_readline_asks_for_input(client):
    run_id = client.start("import sys\nline = sys.stdin.readline()\nprint(repr(line))")
    client.collect(run_id, until=("waiting-input",))
    client.send({"type": "input", "run_id": run_id, "data": "abc"})
    assert client.collect(run_id).stdout == "'abc\\n'\n"


def test_input_when_nothing_waits_is_an_error(client):
    client.send({"type": "input", "run_id": "nope", "data": "x"})
    assert client.recv()["code"] == "NOT_WAITING_INPUT"


def test_interrupting_a_run_waiting_for_input(client):
    run_id = client.start("input('? ')")
    client.collect(run_id, until=("waiting-input",))
    client.send({"type": "interrupt"})
    assert client.recv_type("interrupt-result")[0]["ok"] is True
    result = client.collect(run_id)
    assert result.exit_code == 130
    assert "KeyboardInterrupt" in result.stderr
    assert "query.py" not in result.stderr
    # A late answer to the interrupted question must not feed the next one.
    client.send({"type": "input", "run_id": run_id, "data": "late"})
    assert client.recv()["code"] == "NOT_WAITING_INPUT"
    run_id = client.start("print(input())")
    client.collect(run_id, until=("waiting-input",))
    client.send({"type": "input", "run_id": run_id, "data": "fresh"})
    assert client.collect(run_id).stdout == "fresh\n"


# -- interrupt, cancel, conflicts -------------------------------------------------------------


def test_interrupt_raises_keyboard_interrupt_and_the_namespace_survives(client):
    client.run("kept = 42")
    run_id = client.start("while True: pass")
    time.sleep(0.3)
    client.send({"type": "interrupt", "id": 5})
    assert client.recv_type("interrupt-result")[0] == {
        "type": "interrupt-result",
        "ok": True,
        "id": 5,
    }
    result = client.collect(run_id)
    assert result.exit_code == 130
    assert "KeyboardInterrupt" in result.stderr
    assert 'File "<input-2>", line 1, in <module>' in result.stderr
    assert "query.py" not in result.stderr
    assert client.run("print(kept)").stdout == "42\n"


def test_an_interrupt_sent_right_after_execute_is_not_lost(client):
    client.run("import os; os._exit(1)")  # so the next run also waits for a fresh interpreter
    run_id = client.start("while True: pass")
    client.send({"type": "interrupt"})
    assert client.recv_type("interrupt-result")[0]["ok"] is True
    result = client.collect(run_id, timeout=10)
    assert result.exit_code == 130
    assert "KeyboardInterrupt" in result.stderr


def test_interrupt_with_nothing_running_is_not_ok(client):
    client.send({"type": "interrupt"})
    assert client.recv() == {"type": "interrupt-result", "ok": False}


def test_a_second_execute_while_one_runs_is_a_run_conflict(client):
    run_id = client.start("import time; time.sleep(30)")
    client.send({"type": "execute", "run_id": "other", "mode": "query", "code": "1"})
    error = client.recv()
    assert (error["type"], error["code"], error["run_id"]) == ("error", "RUN_CONFLICT", "other")
    client.send({"type": "cancel", "run_id": run_id})
    assert client.collect(run_id).exit_code == 137


def test_cancel_kills_the_run_and_the_next_one_gets_a_fresh_interpreter(client):
    client.run("x = 1")
    run_id = client.start(
        "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\np.wait()"
    )
    sleep_pid = int(client.recv()["data"])
    client.send({"type": "cancel", "run_id": run_id})
    result = client.collect(run_id, timeout=5)
    assert result.exit_code == 137
    assert "cancelled" in result.stderr
    assert client.run("print('x' in globals())").stdout == "False\n"
    # The whole process group went, not just the interpreter.
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{sleep_pid}") and not _is_zombie(sleep_pid):
        assert time.monotonic() < deadline, "the run's subprocess survived the cancel"
        time.sleep(0.05)


def test_cancel_of_an_unknown_run_is_an_error(client):
    client.send({"type": "cancel", "run_id": "ghost"})
    assert client.recv()["code"] == "NO_SUCH_RUN"


# -- completions ------------------------------------------------------------------------------


def test_completions_come_from_the_live_namespace(client):
    client.run("import os\nmy_variable = 1")
    client.send({"type": "complete", "id": 1, "text": "os.pa", "options": {}})
    answer = client.recv()
    assert answer["type"] == "completions" and answer["id"] == 1
    assert {"os.path", "os.pardir", "os.pathsep"} <= set(answer["items"])
    client.send({"type": "complete", "id": 2, "text": "x = my_v", "options": {}})
    assert client.recv()["items"] == ["my_variable"]
    client.send({"type": "complete", "id": 3, "text": "pri"})
    assert "print" in client.recv()["items"]


def test_completions_during_a_run_answer_empty_at_once(client):
    run_id = client.start("import time; time.sleep(30)")
    sent = time.monotonic()
    client.send({"type": "complete", "id": 9, "text": "os.pa"})
    assert client.recv(timeout=2) == {"type": "completions", "id": 9, "items": []}
    assert time.monotonic() - sent < 0.5
    client.send({"type": "cancel", "run_id": run_id})
    client.collect(run_id)


# -- batch runs -------------------------------------------------------------------------------


def test_batch_build_then_exec(client):
    result = client.run(mode="batch", options={"build": "echo building; touch built", "exec": "ls built; exit 4"})
    assert result.types() == ["output", "build-finished", "output", "finished"]
    assert result.messages[1]["exit_code"] == 0
    assert result.stdout == "building\nbuilt\n"
    assert result.exit_code == 4


def test_a_failed_build_skips_exec_and_finishes_127(client):
    result = client.run(mode="batch", options={"build": "echo oops >&2; exit 2", "exec": "echo never"})
    assert result.types() == ["output", "build-finished", "finished"]
    assert result.messages[1]["exit_code"] == 2
    assert (result.stderr, result.stdout, result.exit_code) == ("oops\n", "", 127)


def test_batch_code_runs_as_a_shell_script_as_the_user(runner, client):
    result = client.run("id -u\npwd\necho $HOME\nexit 3", mode="batch")
    assert result.messages[0] == {
        "type": "build-finished",
        "run_id": "run-1",
        "exit_code": 0,
        "skipped": True,
    }
    assert result.stdout == f"{USER_UID}\n{runner.home}\n{runner.home}\n"
    assert result.exit_code == 3


def test_batch_code_too_long_for_one_argument_runs_from_a_file(client):
    code = "".join(f"echo line{i}\n" for i in range(20000))  # ~250 KB
    result = client.run(code, mode="batch")
    assert result.stdout == "".join(f"line{i}\n" for i in range(20000))
    assert result.exit_code == 0
    assert not [name for name in os.listdir("/tmp") if name.startswith("bai-batch-")]


def test_a_batch_command_that_cannot_start_finishes_127(client):
    result = client.run(mode="batch", options={"exec": "/no/such/program"})
    assert result.exit_code == 127


def test_batch_interrupt_and_cancel(client):
    run_id = client.start(mode="batch", options={"exec": "sleep 30"})
    time.sleep(0.3)
    client.send({"type": "interrupt"})
    assert client.recv_type("interrupt-result")[0]["ok"] is True
    assert client.collect(run_id).exit_code == 130
    run_id = client.start(mode="batch", options={"exec": "trap '' INT; sleep 30"})
    time.sleep(0.3)
    client.send({"type": "cancel", "run_id": run_id})
    assert client.collect(run_id).exit_code == 137


def test_a_shell_runtime_runs_batch_only():
    process = RunnerProcess(runtime_type="shell")
    try:
        c = Client(process.socket_path)
        assert "query" not in c.hello["features"]
        c.send({"type": "execute", "run_id": "q", "mode": "query", "code": "1"})
        assert c.recv()["code"] == "NOT_SUPPORTED"
        assert c.run("echo hi", mode="batch").stdout == "hi\n"
        c.send({"type": "complete", "id": 1, "text": "pri"})
        assert c.recv()["items"] == []
        c.close()
    finally:
        process.stop()


# -- flow control and reconnection ----------------------------------------------------------


def test_5_mb_of_output_arrives_whole_and_in_order_with_bounded_memory(runner, client):
    lines = 5 * 1024 * 1024 // 100
    run_id = client.start(f"for i in range({lines}): print('%099d' % i)")
    time.sleep(1.0)  # do not read: the runner must stop reading user output
    received = []
    while True:
        message = client.recv()
        if message["type"] == "finished":
            break
        received.append(message["data"])
        if len(received) % 8 == 0:
            time.sleep(0.002)  # a slow reader
    assert message == {"type": "finished", "run_id": run_id, "exit_code": 0}
    assert "".join(received) == "".join(f"{i:099d}\n" for i in range(lines))
    assert max(len(data) for data in received) <= 64 * 1024
    assert runner.peak_rss_kib() < 100 * 1024


def test_with_no_agent_user_code_blocks_instead_of_the_runner_growing(runner, client):
    run_id = client.start(
        "import sys\n"
        "for i in range(200):\n"
        "    sys.stdout.write('x' * 100000)\n"
        "    with open('progress', 'w') as f: f.write(str(i))\n"
        "print('end')"
    )
    client.close()
    time.sleep(2.0)  # all 20 MB would be written by now if nothing held user code back
    with open(os.path.join(runner.home, "progress")) as f:
        written = int(f.read() or 0)
    assert written < 100  # about the outbox limit (4 MiB) plus pipe buffers
    assert runner.peak_rss_kib() < 60 * 1024
    c = Client(runner.socket_path)
    assert c.hello["active_run"] == run_id
    received = []
    while True:
        message = c.recv()
        if message["type"] == "finished":
            break
        received.append(message["data"])
    assert "".join(received).endswith("x" * 1000 + "end\n")


def test_a_new_connection_gets_the_rest_of_the_run(runner, client):
    run_id = client.start("import time\nprint('before', flush=True)\ntime.sleep(1.5)\nprint('after')")
    first = client.recv()
    assert (first["type"], first["data"]) == ("output", "before\n")
    client.close()
    c = Client(runner.socket_path)
    assert c.hello["active_run"] == run_id
    result = c.collect(run_id)
    assert (result.stdout, result.exit_code) == ("after\n", 0)


def test_a_new_connection_replaces_the_old_one(runner, client):
    second = Client(runner.socket_path)
    assert client.is_closed()
    assert second.run("print(1)").stdout == "1\n"


def test_a_waiting_input_question_is_asked_again_on_a_new_connection(runner, client):
    run_id = client.start("print(input('again? '))")
    client.collect(run_id, until=("waiting-input",))
    client.close()
    c = Client(runner.socket_path)
    waiting, _ = c.recv_type("waiting-input")
    assert (waiting["run_id"], waiting["prompt"]) == (run_id, "again? ")
    c.send({"type": "input", "run_id": run_id, "data": "yes"})
    assert c.collect(run_id).stdout == "yes\n"


def test_output_of_threads_between_runs_comes_with_the_next_run(client):
    client.run("import threading, time\nthreading.Timer(0.3, print, ['late']).start()")
    time.sleep(0.8)
    assert client.run("print('now')").stdout == "late\nnow\n"


# -- robustness ---------------------------------------------------------------------------------


def test_a_malformed_frame_closes_only_that_connection(runner):
    bad = Client(runner.socket_path)
    bad.sock.sendall(struct.pack(">I", 8) + b"not json")
    assert bad.is_closed()
    huge = Client(runner.socket_path)
    huge.sock.sendall(struct.pack(">I", 64 * 1024 * 1024))  # 64 MiB announced
    assert huge.is_closed()
    good = Client(runner.socket_path)
    assert good.run("print('ok')").stdout == "ok\n"
    assert runner.process.poll() is None


def test_user_code_cannot_reach_the_runner(runner, client):
    result = client.run(
        "import socket, os, signal\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({runner.socket_path!r})\n"
        "    print('connected')\n"
        "except PermissionError:\n"
        "    print('no connect')\n"
        "try:\n"
        f"    os.kill({runner.pid}, signal.SIGTERM)\n"
        "    print('killed')\n"
        "except PermissionError:\n"
        "    print('no kill')\n"
    )
    if os.geteuid() != 0:
        pytest.skip("user code runs as the runner's own user here")  # pragma: no cover
    assert result.stdout == "no connect\nno kill\n"
    assert runner.process.poll() is None


def test_garbage_on_the_interpreter_channel_gets_a_fresh_interpreter(client):
    result = client.run(
        "import os, stat\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        if stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
        "            os.write(fd, b'\\x00\\x00\\x00\\x10garbage garbage!')\n"
        "    except OSError:\n"
        "        pass\n"
        "import time; time.sleep(5)"
    )
    assert result.exit_code != 0
    assert "bad" in result.stderr
    assert client.run("print('recovered')").stdout == "recovered\n"


def test_closing_stdout_and_stderr_fds_does_not_hurt(client):
    assert client.run("import os\nos.close(1)\nos.close(2)\nprint('still shown')").stdout == "still shown\n"
    assert client.run("print('next')").stdout == "next\n"


def test_closing_the_channel_fd_gets_a_fresh_interpreter(client):
    result = client.run(
        "import os, stat\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        if stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
        "            os.close(fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "import time; time.sleep(5)"
    )
    assert result.exit_code != 0
    assert client.run("print('recovered')").stdout == "recovered\n"


def test_forked_children_write_through_the_pipes(client):
    result = client.run(
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('from the child', flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('from the parent')"
    )
    assert result.exit_code == 0
    assert sorted(result.stdout.splitlines()) == ["from the child", "from the parent"]
    assert client.run("print('channel intact')").stdout == "channel intact\n"


def test_sigterm_stops_the_runner_and_its_children(runner, client):
    run_id = client.start("import time; time.sleep(60)")
    time.sleep(0.3)
    children = runner.children()
    assert children
    runner.process.send_signal(signal.SIGTERM)
    assert runner.process.wait(10) == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    assert not os.path.exists(runner.socket_path)
    assert run_id


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- the agent's RunnerLink against the real runner --------------------------------------------


@pytest_twisted.inlineCallbacks
def test_runner_link_drives_a_real_runner(reactor, runner):
    from twisted.internet.defer import Deferred

    link = yield connect_runner(reactor, runner.socket_path, reactor, timeout=10, keepalive_interval=0.2)
    assert isinstance(link, RunnerLink)
    assert link.hello["pid"] == runner.pid
    finished = Deferred()
    messages = []

    def handler(message):
        messages.append(message)
        if message["type"] == "finished":
            finished.callback(message)

    link.handler = handler
    link.send({"type": "execute", "run_id": "a", "mode": "query", "code": "import os\nprint('hi')"})
    done = yield finished
    assert done["exit_code"] == 0
    assert [json.loads(b'"' + m["raw"] + b'"') for m in messages if m["type"] == "output-raw"] == ["hi\n"]
    items = yield link.request_completions("os.pa", {})
    assert "os.path" in items
    ok = yield link.interrupt()
    assert ok is False
    link.close()
    reason = yield link.dead
    assert reason == "closed by the agent"


# -- claim (the warm pool) ------------------------------------------------------------------


def test_a_claimed_runner_gives_user_processes_the_kernels_environment(runner, client):
    assert client.run("x = 1").exit_code == 0  # the pool's interpreter, before the claim
    assert client.run("import os; print(os.environ.get('FROM_CLAIM'))").stdout == "None\n"
    client.send({"type": "claim", "environ": {"FROM_CLAIM": "yes", "HOME": "/elsewhere", "OMP_NUM_THREADS": "2"}})
    # A fresh interpreter, with the environment; HOME stays the kernel's home.
    result = client.run("import os; print(os.environ['FROM_CLAIM'], os.environ['HOME'], 'x' in globals())")
    assert result.stdout == f"yes {runner.home} False\n", result.stdout
    batch = client.run("", mode="batch", options={"exec": "echo $FROM_CLAIM $OMP_NUM_THREADS"})
    assert batch.stdout == "yes 2\n"


def test_a_bad_claim_is_refused(client):
    for environ in (None, ["A=1"], {"A": 1}, {"A=B": "c"}, {"": "x"}, {"A": "nul\0"}):
        client.send({"type": "claim", "environ": environ})
        assert client.recv_type("error")[0]["code"] == "BAD_REQUEST"
