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
  ``{"type": "waiting-input", "request": N, "prompt": P, "is_password": B}``
  ``{"type": "done", "exit_code": N}``           0, 1 (exception), 130 (interrupted), or
                                                 the code of ``SystemExit``
  ``{"type": "completions", "id": N, "items": [...]}``

sys.stdout and sys.stderr both write into one ordered buffer that a small thread flushes
into the channel every few milliseconds during a run, so that their relative order is
kept and small writes are coalesced. Output written between runs (by threads) is held,
up to a limit, and delivered with the next run.

SIGINT raises ``KeyboardInterrupt`` in user code, but never in the middle of writing or
reading a frame (that would break the channel): there it is deferred to the end of that
critical section.
"""

import ast
import builtins
import codecs
import io
import linecache
import os
import select
import signal
import sys
import threading
import time
import traceback
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing into the user's process
if TYPE_CHECKING:
    from typing import Any

# -- imports from the runner directory, which must not stay visible to user code -----

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import completion  # noqa: E402
import framing  # noqa: E402
import jsoncodec  # noqa: E402

for _name in ("completion", "framing", "jsoncodec"):
    sys.modules.pop(_name, None)
# REPL semantics: the working directory (the home), not the runner, heads sys.path.
sys.path[:] = [p for p in sys.path if p not in (_HERE, "")]
sys.path.insert(0, "")

#: Output is flushed when this much is buffered, and otherwise after FLUSH_DELAY.
FLUSH_SIZE = 64 * 1024
FLUSH_DELAY = 0.01
#: Output chunks in the channel are at most this many characters.
CHUNK = 64 * 1024
#: Output written between runs is held up to this size; then writers (threads) block.
LATE_LIMIT = 1024 * 1024
#: A prompt is cut at this length.
MAX_PROMPT = 64 * 1024

EXIT_INTERRUPTED = 128 + signal.SIGINT

_MAIN_THREAD = threading.get_ident()
_forked = False  # set in children forked by user code (os.fork, multiprocessing)


def _encode_text(text):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return text.encode("utf-8", "replace")


# -- SIGINT: deferred inside critical sections ----------------------------------------


class _Interrupts:
    """
    ``armed`` while user code (or a completion) runs: only then does SIGINT raise
    ``KeyboardInterrupt``. ``critical`` is a context manager for the main thread's
    channel I/O: a SIGINT inside is held back and raised on the way out.
    """

    def __init__(self):
        self.armed = False
        self.depth = 0
        self.pending = False

    def handler(self, signum, frame):
        if not self.armed:
            return
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.get_ident() == _MAIN_THREAD:
            self.depth += 1
        return self

    def __exit__(self, *exc_info):
        if threading.get_ident() == _MAIN_THREAD:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                if self.armed:
                    raise KeyboardInterrupt
        return False


_interrupts = _Interrupts()
critical = _interrupts


# -- the channel to the runner ---------------------------------------------------------


class Channel:
    def __init__(self, fd):
        self.fd = fd
        self._decoder = framing.FrameDecoder(messages=False)
        self._payloads = []
        # Threads write whole frames one at a time (a large write to a stream socket
        # can interleave with another thread's).
        self._write_lock = threading.RLock()

    def send_payload(self, payload):
        data = memoryview(framing.encode_payload(payload))
        with critical:
            with self._write_lock:
                while data:
                    data = data[os.write(self.fd, data) :]

    def send(self, message):
        self.send_payload(jsoncodec.dumps(message).encode("utf-8", "replace"))

    def receive(self):
        """The next message (a dict); ``EOFError`` when the runner has gone."""
        while not self._payloads:
            # Wait outside the critical section (a SIGINT may interrupt the wait, and
            # nothing is lost), then read inside it (nothing read may be dropped).
            select.select([self.fd], [], [])
            with critical:
                data = os.read(self.fd, 65536)
                if not data:
                    raise EOFError("the runner closed the channel")
                self._payloads.extend(self._decoder.feed(data))
        return jsoncodec.loads(self._payloads.pop(0).decode("utf-8"))


# -- ordered, coalesced output ------------------------------------------------------------


class Output:
    """The one ordered buffer behind sys.stdout and sys.stderr."""

    def __init__(self, channel):
        self._channel = channel
        # Reentrant: a Python signal handler of user code may print while the main
        # thread is inside write() or a flush.
        self._cond = threading.Condition(threading.RLock())
        self._segments = []  # [stream byte, [texts]] in order
        self._size = 0
        self._flushing = False
        self.running = False
        thread = threading.Thread(target=self._flusher, name="bai-output-flusher")
        thread.daemon = True
        thread.start()

    def write(self, stream, text):
        if _forked:  # a forked child must not touch the channel: use the raw pipes
            os.write(1 if stream == b"o" else 2, _encode_text(text))
            return
        if not text:
            return
        with critical:
            with self._cond:
                if threading.get_ident() != _MAIN_THREAD:
                    while not self.running and self._size >= LATE_LIMIT:
                        self._cond.wait()
                if self._segments and self._segments[-1][0] == stream:
                    self._segments[-1][1].append(text)
                else:
                    self._segments.append([stream, [text]])
                was_empty = not self._size
                self._size += len(text)
                if self.running and self._size >= FLUSH_SIZE:
                    self._flush_locked()
                elif was_empty:
                    self._cond.notify_all()

    def flush(self):
        if _forked:
            return
        with critical:
            with self._cond:
                if self.running:
                    self._flush_locked()

    def _flush_locked(self):
        if self._flushing:  # re-entered (a signal handler printed): the next flush takes it
            return
        self._flushing = True
        try:
            segments, self._segments, self._size = self._segments, [], 0
            for stream, texts in segments:
                text = "".join(texts)
                for start in range(0, len(text), CHUNK):
                    self._channel.send_payload(b"\x01" + stream + _encode_text(text[start : start + CHUNK]))
        finally:
            self._flushing = False
        self._cond.notify_all()  # writers held back between runs may go on

    def start_run(self):
        with critical:
            with self._cond:
                self.running = True
                self._flush_locked()  # what threads wrote since the last run

    def end_run(self):
        with critical:
            with self._cond:
                self._flush_locked()
                self.running = False

    def _flusher(self):
        while True:
            with self._cond:
                while not (self._size and self.running):
                    self._cond.wait()
            time.sleep(FLUSH_DELAY)
            with self._cond:
                if self.running and self._size:
                    self._flush_locked()


class _BinaryWriter(io.RawIOBase):
    """``sys.stdout.buffer``: bytes, decoded as UTF-8 into the same ordered buffer."""

    def __init__(self, text_writer):
        self._text = text_writer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        self._text.write(self._decoder.decode(data))
        return len(data)

    def flush(self):
        self._text.flush()

    def fileno(self):
        return self._text.fileno()

    def close(self):
        self.flush()


class TextWriter(io.TextIOBase):
    """sys.stdout / sys.stderr of user code."""

    encoding = "utf-8"
    errors = "replace"
    line_buffering = False
    mode = "w"

    def __init__(self, output, stream, fd, name):
        self._output = output
        self._stream = stream
        self._fd = fd
        self._name = name
        self.buffer = _BinaryWriter(self)

    @property
    def name(self):
        return self._name

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._output.write(self._stream, text)
        return len(text)

    def flush(self):
        self._output.flush()

    def isatty(self):
        return False

    def fileno(self):
        # The raw pipe: a subprocess given sys.stdout writes there, and still shows.
        return self._fd

    def reconfigure(self, **options):
        pass

    def close(self):
        # Closing the kernel's stdout would only lose output; flush instead.
        self.flush()


# -- input --------------------------------------------------------------------------------


class Input:
    def __init__(self, channel, output):
        self._channel = channel
        self._output = output
        self._lock = threading.Lock()
        self._requests = 0

    def request(self, prompt, is_password):
        """Ask the runner for a line of input; block until it comes."""
        if _forked or not self._output.running:
            raise EOFError("input is only available while a run is active")
        prompt = str(prompt)[:MAX_PROMPT]
        with self._lock:
            self._requests += 1
            request = self._requests
            self._output.flush()
            self._channel.send(
                {
                    "type": "waiting-input",
                    "request": request,
                    "prompt": prompt,
                    "is_password": bool(is_password),
                }
            )
            while True:
                message = self._channel.receive()
                # An answer to an earlier request (one that an interrupt cut short) may
                # still be on its way: only this request's answer counts.
                if message.get("type") == "input" and message.get("request") == request:
                    data = message.get("data")
                    return data if isinstance(data, str) else ""


class InputReader(io.TextIOBase):
    """sys.stdin of user code: each line read is asked for with ``waiting-input``."""

    encoding = "utf-8"
    errors = "replace"
    mode = "r"
    name = "<stdin>"

    def __init__(self, input_):
        self._input = input_

    def readable(self):
        return True

    def isatty(self):
        return False

    def readline(self, size=-1):
        line = self._input.request("", False)
        return line if line.endswith("\n") else line + "\n"

    def read(self, size=-1):
        return self.readline()

    def close(self):
        pass


def _strip_newline(line):
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def _install_getpass(input_):
    def getpass(prompt="Password: ", stream=None):
        return _strip_newline(input_.request(prompt, True))

    module: Any  # the real getpass module, or the stand-in made here
    try:
        import getpass as module
    except ImportError:  # python3-minimal has no getpass: offer a small one
        module = types.ModuleType("getpass")
        module.__doc__ = "getpass for the kernel (the image has none)"

        class GetPassWarning(UserWarning):
            pass

        def getuser():
            for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
                if os.environ.get(name):
                    return os.environ[name]
            import pwd

            return pwd.getpwuid(os.getuid())[0]

        module.GetPassWarning = GetPassWarning
        module.getuser = getuser
        sys.modules["getpass"] = module
    module.getpass = getpass
    module.unix_getpass = getpass
    module.fallback_getpass = getpass


# -- running code -------------------------------------------------------------------------


def _user_traceback(tb):
    """
    The traceback without this module's frames at its head (the code running user code)
    and at its tail (our input() or SIGINT handler, where the exception came from).
    """
    ours = _run_code.__code__.co_filename
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    while entries and entries[0].tb_frame.f_code.co_filename == ours:
        entries.pop(0)
    while entries and entries[-1].tb_frame.f_code.co_filename == ours:
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
    def __init__(self, channel):
        self.channel = channel
        self.output = Output(channel)
        self.stdout = TextWriter(self.output, b"o", 1, "<stdout>")
        self.stderr = TextWriter(self.output, b"e", 2, "<stderr>")
        self.input = Input(channel, self.output)
        self.stdin = InputReader(self.input)
        self.namespace = self._make_main_module().__dict__

    def _make_main_module(self):
        module = types.ModuleType("__main__")
        module.__dict__.update({"__builtins__": builtins, "__spec__": None, "__package__": None})
        sys.modules["__main__"] = module
        return module

    def install(self):
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, self.stdin
        sys.argv = [""]

        def input(prompt=""):
            return _strip_newline(self.input.request(prompt, False))

        builtins.input = input
        _install_getpass(self.input)
        signal.signal(signal.SIGINT, _interrupts.handler)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self):
        # A child forked by user code shares the channel fd: if it wrote frames there,
        # they would interleave with ours. It writes to the raw pipes instead.
        global _forked
        _forked = True
        try:
            os.close(self.channel.fd)
        except OSError:
            pass
        try:
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        except OSError:
            pass

    def execute(self, code, seq):
        filename = f"<input-{seq:d}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        # Runs start on the kernel's own streams, whatever the last one did with them.
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, self.stdin
        self.output.start_run()
        exit_code = 0
        try:
            try:
                _interrupts.armed = True
                # The runner holds back an interrupt until it has seen this, so that a
                # SIGINT can never reach us before the run could take it.
                self.channel.send({"type": "started"})
                _run_code(code, filename, self.namespace)
            finally:
                _interrupts.armed = False
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

    def complete(self, request_id, text):
        items = []
        try:
            _interrupts.armed = True
            try:
                items = completion.complete(self.namespace, text)
            finally:
                _interrupts.armed = False
        except BaseException:  # a property that raises, an interrupt: no completions
            items = []
        self.channel.send({"type": "completions", "id": request_id, "items": items})

    def serve(self):
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


def main(argv):
    fd = int(argv[argv.index("--fd") + 1])
    os.set_inheritable(fd, False)  # subprocesses of user code must not get the channel
    channel = Channel(fd)
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
