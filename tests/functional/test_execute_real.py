"""
Running code in kernels on real Docker through a real agent: every Execute mode,
interrupts, completions, crashes, big output, timeouts, logs, and bad calls.
"""

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from tests.functional.agent_process import docker
from tests.functional.executing import IMAGE, SHELL_IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


@pytest_twisted.inlineCallbacks
def test_query_mode_keeps_state_order_and_survives_crashes(client):
    yield client.create_kernel("q", IMAGE, {"cpu": 1, "mem": "256m"})
    yield run_to_end(client, "q", "query", "x = 41")
    console, answer = yield run_to_end(client, "q", "query", "x + 1")
    assert text(console) == "42\n" and answer["exit_code"] == 0
    console, _ = yield run_to_end(
        client, "q", "query", "import sys; print('a'); print('b', file=sys.stderr); print('c')"
    )
    assert console == [["stdout", "a\n"], ["stderr", "b\n"], ["stdout", "c\n"]]
    console, answer = yield run_to_end(client, "q", "query", "1/0")
    assert answer["exit_code"] == 1 and "ZeroDivisionError" in text(console, "stderr")
    console, answer = yield run_to_end(client, "q", "query", "import os; os._exit(3)")
    assert answer["exit_code"] == 3
    console, answer = yield run_to_end(client, "q", "query", "import ctypes; ctypes.string_at(0)")
    assert answer["exit_code"] != 0
    # A fresh interpreter after the crashes; the kernel stays usable.
    console, answer = yield run_to_end(client, "q", "query", "print('still here')")
    assert text(console) == "still here\n"
    uid_console, _ = yield run_to_end(client, "q", "query", "import os; print(os.getuid())")
    assert text(uid_console) == "1000\n"


@pytest_twisted.inlineCallbacks
def test_input_and_getpass(client):
    yield client.create_kernel("i", IMAGE, {"cpu": 1, "mem": "256m"})
    answer = yield client.execute(
        "i", "query", "name = input('who? ')\nimport getpass\npw = getpass.getpass()\nprint(name, len(pw))"
    )
    assert answer["status"] == "waiting-input" and answer["options"]["is_password"] is False
    assert text(answer["console"]) == "who? "
    answer = yield client.execute("i", "input", "bob", run_id=answer["run_id"])
    assert answer["status"] == "waiting-input" and answer["options"]["is_password"] is True
    answer = yield client.execute("i", "input", "secret", run_id=answer["run_id"])
    assert answer["status"] == "finished" and text(answer["console"]).endswith("bob 6\n")


@pytest.mark.parametrize("image", [IMAGE, SHELL_IMAGE])
@pytest_twisted.inlineCallbacks
def test_batch_mode_build_then_exec(client, image):
    yield client.create_kernel("b", image, {"cpu": 1, "mem": "256m"})
    answer = yield client.execute(
        "b", "batch", options={"build": "echo built > out.txt", "exec": "cat out.txt; exit 4"}
    )
    assert (answer["status"], answer["exit_code"]) == ("build-finished", 0)
    answer = yield client.execute("b", "continue")  # without run_id: the active run
    assert (answer["status"], answer["exit_code"]) == ("finished", 4)
    assert text(answer["console"]) == "built\n"
    answer = yield client.execute("b", "batch", options={"build": "exit 2", "exec": "echo never"})
    assert (answer["status"], answer["exit_code"]) == ("build-finished", 2)
    answer = yield client.execute("b", "continue", run_id=answer["run_id"])
    assert (answer["status"], answer["exit_code"]) == ("finished", 127)
    assert "never" not in text(answer["console"])
    console, answer = yield run_to_end(client, "b", "batch", "echo from script; exit 0")
    assert "from script" in text(console)


@pytest_twisted.inlineCallbacks
def test_interrupt_completions_and_exec_timeout(client):
    yield client.create_kernel("t", IMAGE, {"cpu": 1, "mem": "256m"}, exec_timeout=3)
    with pytest.raises(errors.KernelNotRunning):
        yield client.interrupt_kernel("t")
    yield run_to_end(client, "t", "query", "import os\nkept = 'yes'")
    completions = yield client.get_completions("t", "os.pa")
    assert "os.path" in completions
    answer = yield client.execute(
        "t", "query", "import time\nwhile True: time.sleep(0.05)", options={"flush_timeout": 0.5}
    )
    assert answer["status"] == "continued"
    yield client.interrupt_kernel("t")
    console, answer = yield run_to_end(client, "t", "continue")
    assert answer["exit_code"] == 130 and "KeyboardInterrupt" in text(console)
    console, _ = yield run_to_end(client, "t", "query", "print(kept)")
    assert text(console) == "yes\n"
    console, answer = yield run_to_end(client, "t", "query", "while True: pass", options={"flush_timeout": 10})
    assert answer["status"] == "exec-timeout"


@pytest_twisted.inlineCallbacks
def test_50mb_of_output_arrives_whole_and_in_order(client, agent):
    yield client.create_kernel("big", IMAGE, {"cpu": 1, "mem": "256m"})
    code = "import sys\nfor i in range(500000): sys.stdout.write('%07d' % i + 'x' * 92 + '\\n')"
    console, answer = yield run_to_end(client, "big", "query", code, options={"flush_timeout": 5})
    output = text(console, "stdout")
    assert answer["exit_code"] == 0
    assert len(output) == 50_000_000
    lines = output.split("\n")[:-1]
    assert [int(line[:7]) for line in lines] == list(range(500000))
    # The agent's memory stayed bounded (its buffer is capped; the runner was paused).
    rss_kb = int([line for line in open(f"/proc/{agent.process.pid}/status") if line.startswith("VmHWM")][0].split()[1])
    assert rss_kb < 400_000


@pytest_twisted.inlineCallbacks
def test_bad_calls_get_declared_errors_and_other_kernels_keep_working(client, agent):
    yield client.create_kernel("ok", IMAGE, {"cpu": 0.5, "mem": "256m"})
    yield client.create_kernel("victim", IMAGE, {"cpu": 0.5, "mem": "256m"})
    with pytest.raises(errors.InvalidRequest):
        yield client.execute("ok", "query", "x" * ((1 << 20) + 1))
    with pytest.raises(errors.InvalidRequest):
        yield client.execute("ok", "shout", "1")
    with pytest.raises(errors.InvalidRequest):
        yield client.execute("ok", "continue")
    with pytest.raises(errors.InvalidRequest):
        yield client.execute("ok", "input", "x", run_id="nope")
    with pytest.raises(errors.KernelNotFound):
        yield client.execute("ghost", "query", "1")
    # A kernel whose runner died.
    record = [k for k in (yield client.list_kernels()) if k["kernel_id"] == "victim"][0]
    docker("kill", record["container_id"])
    with pytest.raises((errors.KernelNotRunning, errors.KernelNotFound)):
        yield client.execute("victim", "query", "1")
    console, answer = yield run_to_end(client, "ok", "query", "print('fine')")
    assert text(console) == "fine\n"
    logs = yield client.get_logs("ok", tail=50)
    assert "listening on /run/bai/runner.sock" in logs
