"""
A kernel's environment reaches the user's processes, never the runner (root, pid 1 of the
container): a manager-given ``LD_PRELOAD`` once made a restarted kernel run a library the
user had uploaded, as root (PROTOCOL.md section 6).
"""

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from tests.functional.agent_process import docker
from tests.functional.executing import IMAGE, SHELL_IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


def runner_environment(container_id) -> dict:
    """What the runner process (pid 1 of the container) runs with, read from the host."""
    pid = docker("inspect", "-f", "{{.State.Pid}}", container_id).stdout.strip()
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


@pytest_twisted.inlineCallbacks
def test_loader_and_start_up_variables_are_refused(client, agent):
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONSTARTUP", "PYTHONINSPECT", "GCONV_PATH"):
        with pytest.raises(errors.InvalidRequest, match=name):
            yield client.create_kernel(
                "env-bad", IMAGE, {"cpu": 0.5, "mem": "128m"}, environ={name: "/home/work/evil.so"}
            )
    for environ in ({"OK": "a\nb"}, {"BAD\n": "x"}, {"A=B": "x"}, {"OK": "nul\0"}):
        with pytest.raises(errors.InvalidRequest):
            yield client.create_kernel("env-bad", IMAGE, {"cpu": 0.5, "mem": "128m"}, environ=environ)
    kernels = yield client.list_kernels()
    assert kernels == []


@pytest_twisted.inlineCallbacks
def test_the_environment_reaches_user_code_but_never_the_runner_even_after_a_restart(client, agent):
    environ = {"GREETING": "hello", "PYTHONPATH": "/home/work/lib"}
    record = yield client.create_kernel("env", IMAGE, {"cpu": 0.5, "mem": "128m"}, environ=environ)
    for _attempt in range(2):
        container_id = record["container_id"]
        runner = runner_environment(container_id)
        assert "GREETING" not in runner and "PYTHONPATH" not in runner, runner
        config_env = docker("inspect", "-f", "{{json .Config.Env}}", container_id).stdout
        assert "GREETING" not in config_env
        console, _ = yield run_to_end(
            client, "env", "query", "import os; print(os.environ['GREETING'], os.environ['PYTHONPATH'], os.getuid())"
        )
        assert text(console) == "hello /home/work/lib 1000\n"
        console, _ = yield run_to_end(client, "env", "batch", "echo $GREETING $(id -u)")
        assert text(console, "stdout") == "hello 1000\n"
        # User code cannot read what the runner was handed, nor change it for the next start.
        console, _ = yield run_to_end(
            client,
            "env",
            "query",
            "import os\n"
            "for path in ('/run/bai/environ.json', '/run/bai'):\n"
            "    try:\n"
            "        open(path, 'a').close(); print('writable', path)\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__)\n",
        )
        assert "writable" not in text(console), text(console)
        record = yield client.restart_kernel("env")


@pytest_twisted.inlineCallbacks
def test_the_shell_runtime_gets_the_environment_too(client, agent):
    yield client.create_kernel("env-sh", SHELL_IMAGE, {"cpu": 0.5, "mem": "128m"}, environ={"GREETING": "hi"})
    console, _ = yield run_to_end(client, "env-sh", "batch", "echo $GREETING")
    assert text(console, "stdout") == "hi\n"
