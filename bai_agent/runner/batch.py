"""
Batch runs: ``options.build``, then ``options.exec`` (or the code as a shell script),
each with ``/bin/sh`` as the user in the home directory, in a session of its own.

Messages: output while they run, ``build-finished`` (always, ``"skipped": true`` when
there was no build command), then ``finished``: the exec command's exit code, 127 when
the build failed (exec skipped) or a command could not be started, 137 when cancelled.
"""

from __future__ import annotations

import os
import signal

import procs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any

SHELL = "/bin/sh"
#: Code longer than this (bytes) goes to a script file instead of ``sh -c`` (the kernel
#: refuses single arguments over 128 KiB).
MAX_INLINE_SCRIPT = 100 * 1000
SCRIPT_DIR = "/tmp"

EXIT_BUILD_FAILED = 127
EXIT_NOT_STARTED = 127
EXIT_CANCELLED = 128 + signal.SIGKILL


class BatchRun:
    mode = "batch"

    def __init__(self, runner: Any, run_id: str, build: str | None, exec_command: str | None, code: str) -> None:
        self.runner = runner
        self.run_id = run_id
        self.build = build
        self.exec_command = exec_command
        self.code = code
        self.phase: str | None = None  # "build", "exec", then "done"
        self.pid: int | None = None
        self.pipes: list = []
        self.cancelled = False
        self.waiting = None  # batch runs never wait for input (stdin is /dev/null)
        self._script: str | None = None

    # -- what the runner calls ----------------------------------------------------

    def start(self) -> None:
        if self.build:
            self._spawn([SHELL, "-c", self.build], "build")
        else:
            self.runner.emit({"type": "build-finished", "run_id": self.run_id, "exit_code": 0, "skipped": True})
            self._start_exec()

    def interrupt(self) -> bool:
        return self.pid is not None and procs.signal_group(self.pid, signal.SIGINT)

    def cancel(self) -> None:
        self.cancelled = True
        if self.pid is not None:
            procs.signal_group(self.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        self.cancel()
        self._cleanup()

    # -- phases ------------------------------------------------------------------

    def _start_exec(self):
        if self.exec_command:
            argv = [SHELL, "-c", self.exec_command]
        elif self.code.strip():
            argv = self._code_argv()
            if argv is None:
                return
        else:
            self._finish(0)
            return
        self._spawn(argv, "exec")

    def _code_argv(self):
        script = self.code.encode("utf-8", "replace")
        if len(script) <= MAX_INLINE_SCRIPT:
            return [SHELL, "-c", self.code]
        # Too long for one argument: a file only the user can read, removed at the end.
        path = os.path.join(SCRIPT_DIR, f"bai-batch-{os.urandom(8).hex()}.sh")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o400)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, self.runner.identity.uid, self.runner.identity.gid)
                view = memoryview(script)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as e:
            self._not_started(f"cannot write the script to {SCRIPT_DIR}: {e}")
            return None
        self._script = path
        return [SHELL, path]

    def _spawn(self, argv, phase):
        self.phase = phase
        out_r, out_w = procs.nonblocking_pipe()
        err_r, err_w = procs.nonblocking_pipe()
        devnull = procs.open_devnull()
        try:
            self.pid = procs.spawn(argv, self.runner.identity, devnull, out_w, err_w)
        except procs.SpawnError as e:
            os.close(out_r)
            os.close(err_r)
            self._not_started(f"cannot start {phase}: {e}")
            return
        finally:
            for fd in (out_w, err_w, devnull):
                os.close(fd)
        self.pipes = [procs.OutputPipe(out_r, "stdout"), procs.OutputPipe(err_r, "stderr")]
        self.runner.watch_child(self.pid, self._exited)

    def _not_started(self, why):
        self.runner.emit_output("stderr", f"*** {why}\n")
        if self.phase == "build":
            self.runner.emit({"type": "build-finished", "run_id": self.run_id, "exit_code": EXIT_NOT_STARTED})
        self._finish(EXIT_NOT_STARTED)

    def _exited(self, status):
        # What the process wrote before exiting is in its pipes: take it all (bounded)
        # before the verdict. Output of descendants that outlive it is cut off here.
        for pipe in self.pipes:
            pipe.drain(self.runner.emit_output)
            pipe.close()
        self.pipes = []
        self.pid = None
        code = procs.exit_code(status)
        if self.cancelled:
            self.runner.emit_output("stderr", "*** run cancelled\n")
            self._finish(EXIT_CANCELLED)
        elif self.phase == "build":
            self.runner.emit({"type": "build-finished", "run_id": self.run_id, "exit_code": code})
            if code != 0:
                self._finish(EXIT_BUILD_FAILED)
            else:
                self._start_exec()
        else:
            self._finish(code)

    def _finish(self, exit_code):
        self.phase = "done"
        self._cleanup()
        self.runner.finish_run(self, exit_code)

    def _cleanup(self):
        if self._script is not None:
            try:
                os.unlink(self._script)
            except OSError:
                pass
            self._script = None
