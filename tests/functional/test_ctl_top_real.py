"""
``bai-agent-ctl top`` against a real agent with real kernels: ``--once`` prints the kernels
busiest first, the live view redraws until Ctrl-C and exits 0; and the friendly errors of
``bai-agent-ctl`` as a user meets them.
"""

import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted

from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import env
from tests.functional.executing import IMAGE

pytestmark = pytest.mark.functional


def top_rows(stdout):
    """``{kernel_id: cells}`` of a ``top`` table, and the kernels in the order shown."""
    lines = stdout.splitlines()
    assert lines[2].split()[:2] == ["KERNEL", "STATUS"], stdout
    rows = [line.split() for line in lines[3:] if line.strip()]
    return {row[0]: row for row in rows}, [row[0] for row in rows]


@pytest_twisted.inlineCallbacks
def test_top_once_shows_the_kernels_busiest_first(agent, client, reactor):
    for kernel_id in ("top-idle", "top-busy"):
        yield client.create_kernel(kernel_id, IMAGE, {"cpu": 0.5, "mem": "128m"})
    answer = yield client.execute("top-busy", "query", "while True: pass", options={"flush_timeout": 0.5})
    assert answer["status"] == "continued"
    # The collector samples every 5 s; the CPU rate needs two samples of the busy kernel.
    deadline = time.monotonic() + 30
    while True:
        stats = yield client.get_kernel_stats("top-busy")
        if stats["cpu_util"] > 10:
            break
        assert time.monotonic() < deadline, f"the busy kernel never showed CPU use: {stats}"
        yield sleep(reactor, 0.5)

    done = agent.ctl("top", agent.agent_id, "--once")
    assert done.returncode == 0, done.stderr
    rows, order = top_rows(done.stdout)
    assert done.stdout.startswith(f"{agent.agent_id}: 2 kernel(s), "), done.stdout
    assert order == ["top-busy", "top-idle"], done.stdout
    busy = rows["top-busy"]
    assert busy[1] == "running" and float(busy[2].rstrip("%")) > 10, done.stdout
    assert busy[3].endswith("/0.5") and busy[4].endswith("/128MiB"), done.stdout
    assert busy[-1] == IMAGE
    assert rows["top-idle"][1] == "running"
    yield client.interrupt_kernel("top-busy")


def test_top_redraws_until_ctrl_c_and_exits_0(agent):
    argv = [sys.executable, "-m", "bai_agent.ctl", "--etcd-addr", agent.etcd_addr, "--namespace", agent.namespace]
    process = subprocess.Popen(
        argv + ["top", agent.agent_id, "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        views = 0
        deadline = time.monotonic() + 30
        while views < 3:
            line = process.stdout.readline()
            assert line, f"top ended early: {process.wait()} {process.stderr.read()}"
            views += line.startswith(f"{agent.agent_id}: ")
            assert time.monotonic() < deadline, "top did not redraw three times in 30 s"
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctl_errors_say_what_to_do(agent):
    unknown = agent.ctl("top", "no-such-agent", "--once")
    assert unknown.returncode == 1
    assert f"no agent 'no-such-agent' in namespace '{agent.namespace}'; the agents there: " in unknown.stderr
    assert agent.agent_id in unknown.stderr
    code_as_file = agent.ctl("run", agent.agent_id, "k1", "print(1)")
    assert code_as_file.returncode == 1
    assert "use -c: -c 'print(1)'" in code_as_file.stderr, code_as_file.stderr
    no_etcd = subprocess.run(
        [sys.executable, "-m", "bai_agent.ctl", "--etcd-addr", "127.0.0.1:1", "agents"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert no_etcd.returncode == 1
    assert no_etcd.stderr.startswith("bai-agent-ctl: cannot reach etcd at 127.0.0.1:1 (--etcd-addr): ")
