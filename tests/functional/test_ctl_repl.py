"""
``bai-agent-ctl repl`` and ``bai-agent-ctl run`` against a real agent and real kernels,
driven like a person would: the REPL through a pseudo-terminal (Ctrl-C as ``\\x03``,
Ctrl-D as ``\\x04``), ``run`` as a command whose output and exit status are checked.
Every wait has a time limit, so a hang fails the test instead of blocking it.
"""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.functional.agent_process import containers_of, env, running_agent

pytestmark = pytest.mark.functional


def our_containers(agent):
    return containers_of(agent.agent_id)


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    # An id of its own: container names and labels do not meet another run's on this Docker.
    with running_agent(tmp_path, etcd_server.addr, f"agent-ctl-{os.getpid()}") as process:
        yield process


def ctl_argv(agent, *args):
    return [
        sys.executable,
        "-m",
        "bai_agent.ctl",
        "--etcd-addr",
        agent.etcd_addr,
        "--namespace",
        agent.namespace,
        *args,
    ]


class Terminal:
    """A command on a pseudo-terminal of its own (its controlling terminal), typed at."""

    def __init__(self, argv):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env(),
            close_fds=True,
            preexec_fn=self._take_terminal,
        )
        os.close(slave)
        self.master = master
        self.output = ""
        self.seen = 0  # what expect() has matched so far

    @staticmethod
    def _take_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def send(self, text):
        os.write(self.master, text.encode())

    def _read(self, timeout):
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return None
        if not data:
            return None
        self.output += data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
        return True

    def expect(self, pattern, timeout=30):
        """Wait for ``pattern`` (a regex) in the output after the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.seen)
            if match:
                self.seen = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or self._read(min(left, 0.5)) is None and not regex.search(self.output, self.seen):
                raise AssertionError(
                    f"no {pattern!r} within {timeout}s; output after the last match:\n{self.output[self.seen :]!r}"
                )

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        try:
            return self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; output:\n{self.output[-2000:]!r}") from None

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        os.close(self.master)


@pytest.fixture
def terminals():
    opened = []
    yield lambda argv: opened.append(Terminal(argv)) or opened[-1]
    for terminal in opened:
        terminal.close()


PROMPT = r"(?m)^>>> $"
MORE = r"(?m)^\.\.\. $"


def test_repl_at_a_terminal_runs_blocks_answers_input_interrupts_and_destroys_its_kernel(agent, terminals):
    repl = terminals(ctl_argv(agent, "repl", agent.agent_id, "--kernel-id", "repl-ft", "--mem", "256m"))
    repl.expect(PROMPT, timeout=90)
    assert len(our_containers(agent)) == 1

    repl.send("x = 6*7\n")
    repl.expect(PROMPT)
    repl.send("print(x)\n")
    repl.expect(r"(?m)^42$")
    repl.expect(PROMPT)

    repl.send("for i in range(2):\n")
    repl.expect(MORE)
    repl.send("    print('row', i)\n")
    repl.expect(MORE)
    repl.send("\n")
    repl.expect(r"(?m)^row 0\nrow 1$")
    repl.expect(PROMPT)

    repl.send("name = input('who? ')\n")
    repl.expect(r"(?m)^who\? $")
    repl.send("bob\n")
    repl.expect(PROMPT)
    repl.send("print('hi', name)\n")
    repl.expect(r"(?m)^hi bob$")
    repl.expect(PROMPT)

    repl.send("while True:\n")
    repl.expect(MORE)
    repl.send("    n = 1\n")
    repl.expect(MORE)
    repl.send("\n")
    time.sleep(1.0)  # the loop is running
    repl.send("\x03")
    # The kernel's traceback: the run was interrupted where it was.
    repl.expect(r"Traceback \(most recent call last\):\n(.*\n)*?KeyboardInterrupt\n", timeout=20)
    repl.expect(PROMPT)
    repl.send("print('alive')\n")
    repl.expect(r"(?m)^alive$")
    repl.expect(PROMPT)

    # Ctrl-C at the prompt drops the half-typed block.
    repl.send("if True:\n")
    repl.expect(MORE)
    repl.send("\x03")
    repl.expect(r"KeyboardInterrupt\n>>> $")
    repl.send("x + 1\n")
    repl.expect(r"(?m)^43$")
    repl.expect(PROMPT)

    repl.send("\x04")
    assert repl.wait(60) == 0
    assert our_containers(agent) == []


def test_repl_exit_and_sigterm_both_destroy_the_kernel(agent, terminals):
    repl = terminals(ctl_argv(agent, "repl", agent.agent_id, "--kernel-id", "repl-exit"))
    repl.expect(PROMPT, timeout=90)
    repl.send("exit()\n")
    assert repl.wait(60) == 0
    assert our_containers(agent) == []

    repl = terminals(ctl_argv(agent, "repl", agent.agent_id, "--kernel-id", "repl-term"))
    repl.expect(PROMPT, timeout=90)
    assert len(our_containers(agent)) == 1
    repl.process.send_signal(signal.SIGTERM)
    assert repl.wait(60) == 128 + signal.SIGTERM
    assert our_containers(agent) == []


def test_repl_reads_piped_lines_without_prompts(agent):
    script = (
        "total = 0\nfor i in range(4):\n    total += i\n\nprint('total', total)\n"
        "word = input()\nhello\nprint(word.upper())\n"
    )
    done = subprocess.run(
        ctl_argv(agent, "repl", agent.agent_id), input=script, capture_output=True, text=True, env=env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "total 6\nHELLO\n"
    assert ">>>" not in done.stdout + done.stderr
    assert our_containers(agent) == []


def test_repl_reports_a_kernel_that_exists_and_leaves_it(agent):
    created = agent.ctl("create", agent.agent_id, "taken", "--mem", "128m")
    assert created.returncode == 0, created.stderr
    done = subprocess.run(
        ctl_argv(agent, "repl", agent.agent_id, "--kernel-id", "taken"),
        input="",
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert done.returncode == 1
    assert "KernelExists" in done.stderr
    assert len(our_containers(agent)) == 1


@pytest.fixture
def kernel(agent):
    created = agent.ctl("create", agent.agent_id, "runs", "--mem", "256m", "--exec-timeout", "3")
    assert created.returncode == 0, created.stderr
    return "runs"


def run_ctl(agent, *args, stdin="", timeout=60):
    return subprocess.run(
        ctl_argv(agent, *args), input=stdin, capture_output=True, text=True, env=env(), timeout=timeout
    )


def test_run_prints_output_and_exits_with_the_runs_exit_code(agent, kernel, tmp_path):
    done = run_ctl(
        agent,
        "run",
        agent.agent_id,
        kernel,
        "-c",
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nraise SystemExit(3)",
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "to stdout\n"
    assert "to stderr\n" in done.stderr

    source = tmp_path / "sum.py"
    source.write_text("print(sum(range(10)))\n")
    done = run_ctl(agent, "run", agent.agent_id, kernel, str(source))
    assert (done.returncode, done.stdout) == (0, "45\n"), done.stderr

    done = run_ctl(agent, "run", agent.agent_id, kernel, "-", stdin="print('from stdin')\n1/0\n")
    assert done.returncode == 1
    assert done.stdout == "from stdin\n"
    assert "ZeroDivisionError" in done.stderr

    done = run_ctl(agent, "run", agent.agent_id, kernel, "-c", "print(input('q? ') * 2)", stdin="ab\n")
    assert (done.returncode, done.stdout) == (0, "q? abab\n"), done.stderr

    done = run_ctl(
        agent, "run", agent.agent_id, kernel, "--batch", "--build", "echo built", "--exec", "echo ran; exit 4"
    )
    assert (done.returncode, done.stdout) == (4, "built\nran\n"), done.stderr

    done = run_ctl(agent, "run", agent.agent_id, kernel, "-c", "import time; time.sleep(30)")
    assert done.returncode == 124
    assert "exec timeout" in done.stderr


def test_run_shows_output_as_it_comes_and_ctrl_c_interrupts_it(agent, kernel):
    code = "import time\nprint('started', flush=True)\ntime.sleep(2.5)\nprint('late')"
    process = subprocess.Popen(
        ctl_argv(agent, "run", agent.agent_id, kernel, "-c", code),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready, "no output while the run was running"
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 130
    assert "KeyboardInterrupt" in err
    assert "late" not in out


def test_interrupt_command_interrupts_the_active_run(agent, kernel):
    process = subprocess.Popen(
        ctl_argv(agent, "run", agent.agent_id, kernel, "-c", "print('go', flush=True)\nimport time; time.sleep(2.5)"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready and process.stdout.readline() == "go\n"
        interrupted = run_ctl(agent, "interrupt", agent.agent_id, kernel)
        assert interrupted.returncode == 0, interrupted.stderr
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 130
    assert "KeyboardInterrupt" in err
    idle = run_ctl(agent, "interrupt", agent.agent_id, kernel)
    assert idle.returncode == 1
    assert "KernelNotRunning" in idle.stderr
