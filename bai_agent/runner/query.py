"""
The persistent interpreter of a ``python`` kernel: a child of the runner, running as the
user, that keeps its globals between runs (``query`` mode).

Started by the runner as ``RUNTIME -u /opt/bai/runner/query.py --fd N`` with fd 0 on
/dev/null, fds 1 and 2 on pipes the runner reads ("raw" output: subprocesses, os.write,
faulthandler), and fd N one end of a socket pair: the *channel*. Over the channel, in the
runner's frames (4-byte big-endian length + payload):

runner -> here (JSON objects):
  ``{"type": "execute", "seq": N, "code": C}``   run C; answer ``done`` when it ends
  ``{"type": "input", "request": N, "data": T}``  the answer to ``waiting-input`` N
  ``{"type": "complete", "id": N, "text": T}``   answer ``completions``

here -> runner:
  ``{"type": "ready", "pid": P, "python": V}``
  ``{"type": "started"}``                        the run's code is about to run: from
                                                 now on SIGINT raises KeyboardInterrupt
  ``\\x01`` + ``o``/``e`` + UTF-8 text            output of sys.stdout / sys.stderr
  ``\\x01`` + ``r`` + UTF-8 JSON                  one rich item, ``["html", TEXT]`` or
                                                 ``["media", [MIME, DATA]]`` (display.py)
  ``{"type": "waiting-input", "request": N, "prompt": P, "is_password": B}``
  ``{"type": "done", "exit_code": N}``           0, 1 (exception), 130 (interrupted), or
                                                 the code of ``SystemExit``
  ``{"type": "completions", "id": N, "items": [...]}``

The standard streams of user code are in ``userio.py``, the completer in
``completion.py``, rich output (``display()``, rich expression results, matplotlib
figures) in ``display.py``; this module is the REPL: it runs the code of each ``execute`` in
one namespace that lives on, and shows the user's tracebacks without our frames.

sys.stdout and sys.stderr both write into one ordered buffer that a small thread flushes
into the channel every few milliseconds during a run, so that their relative order is
kept and small writes are coalesced. Output written between runs (by threads) is held,
up to a limit, and delivered with the next run.

SIGINT raises ``KeyboardInterrupt`` in user code, but never in the middle of writing or
reading a frame (that would break the channel): there it is deferred to the end of that
critical section.
"""

from __future__ import annotations

import ast
import builtins
import linecache
import os
import signal
import sys
import traceback
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing into the user's process
if TYPE_CHECKING:
    from typing import Any

# -- imports from the runner directory, which must not stay visible to user code -----

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import completion  # noqa: E402
import display  # noqa: E402
import userio  # noqa: E402

for _name in ("completion", "display", "framing", "jsoncodec", "userio"):
    sys.modules.pop(_name, None)
# REPL semantics: the working directory (the home), not the runner, heads sys.path.
sys.path[:] = [p for p in sys.path if p not in (_HERE, "")]
sys.path.insert(0, "")

EXIT_INTERRUPTED = 128 + signal.SIGINT


# -- running code -------------------------------------------------------------------------


def _user_traceback(tb):
    """
    The traceback without our frames at its head (the code running user code) and at
    its tail (our input(), our streams or SIGINT handler, where the exception came from):
    those of this module and of ``userio``.
    """
    ours = (
        _run_code.__code__.co_filename,
        userio.strip_newline.__code__.co_filename,
        display.rich_item.__code__.co_filename,
    )
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    while entries and entries[0].tb_frame.f_code.co_filename in ours:
        entries.pop(0)
    while entries and entries[-1].tb_frame.f_code.co_filename in ours:
        entries.pop()
    result = None
    for entry in reversed(entries):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


def _print_exception(exc_type, exc, tb):
    tb = _user_traceback(tb)
    sys.last_type, sys.last_value, sys.last_traceback = exc_type, exc, tb
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(text)


def _run_code(code, filename, namespace):
    """Compile and run ``code``; a last expression statement is shown like the REPL does."""
    tree: Any = compile(code, filename, "exec", ast.PyCF_ONLY_AST, True)  # an ast.Module
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Interactive(body=[tree.body.pop()])
    exec(compile(tree, filename, "exec", 0, True), namespace)
    if last is not None:
        # "single" mode passes the value to sys.displayhook: repr to stdout, and ``_``.
        exec(compile(last, filename, "single", 0, True), namespace)


class Interpreter:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.output = userio.Output(channel)
        self.stdout = userio.TextWriter(self.output, b"o", 1, "<stdout>")
        self.stderr = userio.TextWriter(self.output, b"e", 2, "<stderr>")
        self.input = userio.Input(channel, self.output)
        self.stdin = userio.InputReader(self.input)
        self.namespace = self._make_main_module().__dict__

    def _make_main_module(self):
        module = types.ModuleType("__main__")
        module.__dict__.update({"__builtins__": builtins, "__spec__": None, "__package__": None})
        sys.modules["__main__"] = module
        return module

    def install(self) -> None:
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, self.stdin
        sys.argv = [""]

        def input(prompt=""):
            return userio.strip_newline(self.input.request(prompt, False))

        builtins.input = input
        userio.install_getpass(self.input)
        signal.signal(signal.SIGINT, userio.interrupts.handler)
        display.install(self.output)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self):
        # A child forked by user code shares the channel fd: if it wrote frames there,
        # they would interleave with ours. It writes to the raw pipes instead.
        userio.mark_forked()
        try:
            os.close(self.channel.fd)
        except OSError:
            pass
        try:
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        except OSError:
            pass

    def execute(self, code: str, seq: int) -> None:
        filename = f"<input-{seq:d}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        # Runs start on the kernel's own streams, whatever the last one did with them.
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, self.stdin
        self.output.start_run()
        exit_code = 0
        try:
            try:
                userio.interrupts.armed = True
                # The runner holds back an interrupt until it has seen this, so that a
                # SIGINT can never reach us before the run could take it.
                self.channel.send({"type": "started"})
                display.start_run()
                try:
                    _run_code(code, filename, self.namespace)
                finally:
                    # Figures left open are shown even when the code failed (as a
                    # notebook does); an interrupt still cuts this short.
                    display.end_run()
            finally:
                userio.interrupts.armed = False
        except SystemExit as e:
            if e.code is None:
                exit_code = 0
            elif isinstance(e.code, int):
                exit_code = e.code & 0xFF if e.code >= 0 else e.code % 256
            else:
                sys.stderr.write(f"{e.code}\n")
                exit_code = 1
        except KeyboardInterrupt:
            _print_exception(*sys.exc_info())
            exit_code = EXIT_INTERRUPTED
        except BaseException:
            _print_exception(*sys.exc_info())
            exit_code = 1
        self.output.end_run()
        self.channel.send({"type": "done", "exit_code": exit_code})

    def complete(self, request_id: object, text: str) -> None:
        items = []
        try:
            userio.interrupts.armed = True
            try:
                items = completion.complete(self.namespace, text)
            finally:
                userio.interrupts.armed = False
        except BaseException:  # a property that raises, an interrupt: no completions
            items = []
        self.channel.send({"type": "completions", "id": request_id, "items": items})

    def serve(self) -> None:
        self.channel.send({"type": "ready", "pid": os.getpid(), "python": "{}.{}.{}".format(*sys.version_info[:3])})
        while True:
            try:
                message = self.channel.receive()
            except EOFError:
                return
            kind = message.get("type")
            if kind == "execute":
                self.execute(str(message.get("code", "")), message.get("seq", 0))
            elif kind == "complete":
                self.complete(message.get("id"), str(message.get("text", "")))
            # anything else ("input" that came too late) is dropped


def main(argv: list) -> None:
    fd = int(argv[argv.index("--fd") + 1])
    os.set_inheritable(fd, False)  # subprocesses of user code must not get the channel
    channel = userio.Channel(fd)
    interpreter = Interpreter(channel)
    interpreter.install()
    try:
        import faulthandler

        # A crash (segfault) shows the user's stack on the raw stderr pipe.
        faulthandler.enable(file=sys.__stderr__, all_threads=True)  # type: ignore[arg-type]
    except Exception:
        pass
    try:
        interpreter.serve()
    except BaseException:  # the channel broke: say why on the raw stderr pipe
        try:
            traceback.print_exc(file=sys.__stderr__)
        finally:
            os._exit(70)
    # The runner has gone: leave at once, whatever threads user code left running.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
