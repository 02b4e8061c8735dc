"""
Hypothesis strategies for raw AMP boxes of every manager -> agent command (PROTOCOL.md
section 2), valid and not, for the fuzz tests.

They work below the typed client, on the box itself (a dict of bytes to bytes with
``_command``; the sender adds ``_ask``), so that they also produce what no ``AgentClient``
can send: integers that are not numbers, booleans that are not ``True``/``False``, text
that is not UTF-8, JSON that does not parse or parses to the wrong type, Big values cut
into chunks and broken chunk sequences, missing and unknown keys.

``command_box(command, kernel_ids=...)`` draws one box for a command; ``any_command_box``
one for any of them. ``serialise`` turns a box into its bytes on the wire, ``RawManager``
sends boxes and files the answers, and ``answer_problem`` judges an answer box against
the command's declared contract. ``draw_examples`` draws a list of values up front, for
tests that cannot run inside ``@given`` (those on a real reactor).
"""

import itertools
import json
import string

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from twisted.protocols import amp
from zope.interface import implementer

from bai_agent.protocol import commands, errors
from bai_agent.protocol.arguments import MAX_VALUE_LENGTH, Big, BigJson, BigUnicode, Json

IMAGE = "bai-kernel/python:3.11"
MAX_KEY_LENGTH = 0xFF
RESERVED_KEYS = (amp.COMMAND, amp.ASK, amp.ANSWER, amp.ERROR, amp.ERROR_CODE, amp.ERROR_DESCRIPTION)
COMMON_ERROR_CODES = frozenset(error.code for error in errors.COMMON_ERRORS)
#: Commands that may answer UNHANDLED: known to the protocol, not yet implemented by the agent.
MAY_BE_UNHANDLED = frozenset({commands.GetKernelStats.commandName})


# -- argument kinds ---------------------------------------------------------------------------


def argument_kind(argument) -> str:
    """The wire kind of an AMP argument object: the order matters, the Bigs subclass each other."""
    for kind, cls in (
        ("big-json", BigJson),
        ("big-unicode", BigUnicode),
        ("big", Big),
        ("json", Json),
        ("unicode", amp.Unicode),
        ("integer", amp.Integer),
        ("boolean", amp.Boolean),
        ("float", amp.Float),
        ("bytes", amp.String),
    ):
        if isinstance(argument, cls):
            return kind
    raise TypeError(f"no strategy for argument type {type(argument).__name__}")


# -- building blocks ------------------------------------------------------------------------

#: Text that trips up naive handling: NUL, controls, bidi overrides, combining marks,
#: astral characters, and text that is fine for Python but is not valid as a file name.
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\u202eevil",
            "e\u0301\u0301\u0301",
            "\U0001f600" * 10,
            "\ufeffbom",
            "\r\n\t",
            "%s%n%x",
            "{0}{1}",
            "' OR 1=1 --",
            "${HOME}",
            "$(reboot)",
            "\\\\?\\C:\\",
        ]
    ),
)

#: Bytes that are not UTF-8: stray continuation bytes, overlong forms, encoded surrogates.
invalid_utf8 = st.one_of(
    st.sampled_from(
        [b"\xff", b"\xfe\xff", b"\x80abc", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xe2\x82"]
    ),
    st.binary(min_size=1, max_size=64).filter(lambda data: not _is_utf8(data)),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def long_text(min_chars=65, max_chars=MAX_VALUE_LENGTH):
    """Long text built cheaply from a repeated piece (cut to one AMP value where it must fit)."""
    return st.builds(
        lambda piece, size: (piece * (size // len(piece) + 1))[:size],
        st.sampled_from(["a", "ab/", "../", "\u00e9", "\U0001f600", "k" * 63]),
        st.integers(min_value=min_chars, max_value=max_chars),
    )


#: Integers around every boundary the agent might check, and far past them.
odd_integers = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from(
        [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), 10**100, -(10**100), 365 * 24 * 3600 + 1]
    ),
)

#: Encodings an ``Integer`` argument must refuse (or parse, for the odd-but-valid ones).
bad_integer_bytes = st.one_of(
    st.sampled_from(
        [
            b"",
            b"x",
            b" ",
            b"1.5",
            b"0x10",
            b"1e3",
            b"--1",
            b"+",
            b"nan",
            b"inf",
            b"\xff",
            b"1\x00",
            b"\xd9\xa3",
            b"1_000",
            b" 7 ",
            b"9" * 5000,
            b"-" + b"9" * 4400,
        ]
    ),
    invalid_utf8,
    st.binary(max_size=20),
)

bad_boolean_bytes = st.one_of(
    st.sampled_from([b"", b"true", b"false", b"TRUE", b"1", b"0", b"yes", b"True ", b"\xff"]),
    st.binary(max_size=8),
)

bad_json_bytes = st.one_of(
    st.sampled_from(
        [
            b"",
            b"{",
            b"{nope",
            b"[1,",
            b"NaN",
            b"Infinity",
            b"-Infinity",
            b'{"cpu": NaN}',
            b'{"mem": Infinity}',
            b"\x00",
            b"'single'",
            b"{'a': 1}",
            b'{"a": 1} trailing',
            b'"\\ud800"',
            b"1e999999",
            b"[" * 30000 + b"]" * 30000,
            b'{"a":' * 10000 + b"1" + b"}" * 10000,
        ]
    ),
    invalid_utf8,
    st.binary(max_size=40),
)

#: Any JSON value: the right shape for no argument in particular.
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        odd_integers,
        st.floats(allow_nan=False, allow_infinity=False),
        odd_text,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(odd_text, children, max_size=4),
    ),
    max_leaves=12,
)


def dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# -- meaningful values per argument ----------------------------------------------------------

kernel_id_shapes = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"),
    st.sampled_from(
        [
            "",
            "-leading-dash",
            ".hidden",
            "_under",
            "..",
            "../../etc",
            "a/b",
            "k\x00",
            "k\n",
            "k" * 64,
            "k" * 65,
            "k" * 1000,
            "\u00e9t\u00e9",
            "K1 ",
            " k1",
            "k1\u200b",
            "\U0001f600",
        ]
    ),
)

relative_paths = st.one_of(
    st.sampled_from(
        [
            "a.txt",
            "dir/sub/file.bin",
            "./a.txt",
            "a//b",
            "",
            ".",
            "..",
            "../",
            "../../etc/passwd",
            "a/../../b",
            "a/./../a.txt",
            "/etc/passwd",
            "//etc",
            "~/x",
            "a\x00b",
            "x" * 255,
            "x" * 256,
            "d/" * 2100,
            "\u00e9/\U0001f600",
            "proc/self/root",
            "con",
            "runner.sock",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "./_-", max_size=30),
    long_text(4000, 6000),
)

resources = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "cpu": st.one_of(st.sampled_from([0.25, 0.5, 1, 2, 4]), st.floats(allow_nan=False), odd_integers),
            "mem": st.one_of(
                st.sampled_from(
                    ["64m", "128m", "256m", "1g", "512M", "0", "-1m", "1e9999", "9" * 400, "1.5g", "m", "", "8t"]
                ),
                st.integers(min_value=-1, max_value=1 << 34),
                odd_integers,
            ),
            "cuda.device": st.one_of(st.integers(min_value=-2, max_value=3), odd_integers),
        },
    ),
    st.just({"cpu": 1, "mem": "128m"}),
    st.just({"cpu": 1, "mem": "128m", "gpu": 1}),
    st.just({"cpu": True, "mem": False}),
    st.just({"cpu": "1", "mem": []}),
    json_values,
)

environ = st.one_of(
    st.dictionaries(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z"), st.text(max_size=30), max_size=5),
    st.dictionaries(odd_text, json_values, max_size=3),
    st.just({"PATH": "/nowhere", "LD_PRELOAD": "/tmp/evil.so", "HOME": "/"}),
    st.just({"A": "x" * 40000}),
    st.just({"A=B": "c"}),
    json_values,
)

mount_paths = st.sampled_from(
    [
        "/",
        "/etc",
        "/tmp",
        "/tmp/../etc",
        "/home/work",
        "/run/bai",
        "/proc/1/root",
        "relative",
        "",
        "/data:/x",
        "/a\x00b",
        "//etc",
    ]
)

mounts = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"source": mount_paths, "target": mount_paths},
            optional={"mode": st.sampled_from(["ro", "rw", "RW", "", "x"]), "extra": json_values},
        ),
        max_size=3,
    ),
    st.just([{"source": "/etc", "target": "/mnt"}] * 65),
    json_values,
)

timeouts = st.one_of(st.integers(min_value=0, max_value=30), odd_integers)

execute_options = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "flush_timeout": st.one_of(
                st.sampled_from([0, 0.5, 2, 2.0, 300, 300.5, -1, 1e308, True]),
                st.floats(allow_nan=False),
                st.text(max_size=5),
            ),
            "build": st.one_of(st.sampled_from(["true", "exit 3", ""]), json_values),
            "exec": st.one_of(st.sampled_from(["echo hi", ""]), json_values),
        },
    ),
    json_values,
)

completion_options = st.one_of(
    st.fixed_dictionaries({}, optional={"line": odd_integers, "col": odd_integers}),
    json_values,
)


#: Meaningful values per (command, argument); the generic kind strategies cover the rest.
def _meaningful(command_name: bytes, name: bytes, kernel_ids):
    table = {
        b"kernel_id": st.one_of(kernel_ids, kernel_id_shapes) if kernel_ids is not None else kernel_id_shapes,
        b"image": st.one_of(
            st.just(IMAGE), st.sampled_from(["", "nope:1", "../" + IMAGE, IMAGE + " ", "plain/debian:12"]), odd_text
        ),
        b"resources": resources,
        b"environ": environ,
        b"mounts": mounts,
        b"idle_timeout": timeouts,
        b"exec_timeout": timeouts,
        b"reason": st.one_of(
            st.sampled_from(
                ["user-requested", "idle-timeout", "exec-timeout", "agent-reset", "oom-killed", "restarting", ""]
            ),
            odd_text,
        ),
        b"mode": st.one_of(
            st.sampled_from(["query", "batch", "input", "continue", "QUERY", "", "interactive"]), odd_text
        ),
        b"run_id": st.one_of(kernel_id_shapes, st.sampled_from(["r1", "nope"])),
        b"code": st.one_of(
            st.sampled_from(["print(1)", "x = 1", "", "while True: pass", "input()", "import os; os._exit(3)"]),
            odd_text,
            long_text(1000, MAX_VALUE_LENGTH * 2),
            st.just("#" * ((1 << 20) + 1)),
        ),
        b"options": execute_options if command_name == commands.Execute.commandName else completion_options,
        b"text": st.one_of(st.sampled_from(["pri", "os.pa", "", "import "]), odd_text),
        b"path": relative_paths,
        b"data": st.one_of(
            st.binary(max_size=64),
            st.builds(lambda n: b"\x00\xff" * n, st.integers(min_value=0, max_value=MAX_VALUE_LENGTH * 3 // 2)),
            st.just(b"x" * ((1 << 20) + 1)),
        ),
        b"append": st.booleans(),
        b"offset": st.one_of(st.integers(min_value=0, max_value=100), odd_integers),
        b"length": st.one_of(st.integers(min_value=0, max_value=1 << 20), st.just((1 << 20) + 1), odd_integers),
        b"tail": st.one_of(st.integers(min_value=0, max_value=100), odd_integers),
        b"since": st.one_of(st.integers(min_value=0, max_value=50), odd_integers),
        b"payload": st.one_of(odd_text, long_text()),
        b"service": st.one_of(st.sampled_from(["jupyter", "nope", "", "Jupyter", "../x"]), odd_text),
        b"mac": st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), odd_text, long_text()),
        b"image_pull": st.one_of(st.sampled_from(["missing", "always", "never", "", "MISSING", "sometimes"]), odd_text),
        b"registry_auth": st.one_of(
            st.fixed_dictionaries({"username": st.text(max_size=5), "password": st.text(max_size=5)}),
            json_values,
        ),
    }
    return table.get(name)


def _valid(command_name: bytes, name: bytes, kernel_ids):
    """Values a careful manager would send, so that whole boxes often get past validation."""
    table = {
        b"kernel_id": st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z")
        if kernel_ids is None
        else st.one_of(kernel_ids, st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z"))
        if command_name == commands.CreateKernel.commandName
        else kernel_ids,
        b"image": st.just(IMAGE),
        b"resources": st.fixed_dictionaries(
            {"cpu": st.sampled_from([0.25, 0.5, 1]), "mem": st.sampled_from(["64m", "128m", 256 << 20])}
        ),
        b"environ": st.dictionaries(st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,8}\Z"), st.text(max_size=10), max_size=3),
        b"mounts": st.just([]),
        b"idle_timeout": st.integers(0, 30),
        b"exec_timeout": st.integers(0, 30),
        b"reason": st.sampled_from(["user-requested", "idle-timeout"]),
        b"mode": st.sampled_from(["query", "batch", "input", "continue"]),
        b"run_id": st.from_regex(r"\A[a-z0-9]{1,8}\Z"),
        b"code": st.sampled_from(["print(1)", "x = 1", "", "input()"]),
        b"options": st.fixed_dictionaries({"flush_timeout": st.sampled_from([0, 0.5, 2])})
        if command_name == commands.Execute.commandName
        else st.fixed_dictionaries({"line": st.integers(0, 3), "col": st.integers(0, 9)}),
        b"text": st.sampled_from(["pri", "os.pa", ""]),
        b"path": st.sampled_from(["a.txt", "d/b.bin", "d", "."]),
        b"data": st.binary(max_size=100),
        b"append": st.booleans(),
        b"offset": st.integers(0, 100),
        b"length": st.integers(0, 1 << 20),
        b"tail": st.integers(0, 100),
        b"since": st.integers(0, 20),
        b"payload": st.text(max_size=20),
        b"service": st.sampled_from(["jupyter", "sshd"]),
        b"mac": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        # "never": a well-behaved fuzzed create never waits on a registry.
        b"image_pull": st.sampled_from(["missing", "never"]),
        b"registry_auth": st.none(),
    }
    return table.get(name)


# -- encodings ------------------------------------------------------------------------------


def _encode(kind: str, value) -> bytes:
    if kind in ("json", "big-json"):
        return dumps(value)
    if kind in ("unicode", "big-unicode"):
        return value.encode("utf-8", "surrogatepass")
    if kind == "integer":
        return str(value).encode("ascii")
    if kind == "boolean":
        return b"True" if value else b"False"
    if kind == "float":
        return repr(float(value)).encode("ascii")
    return bytes(value)


def _generic_values(kind: str):
    """Well-typed values of a kind, with nothing meant for the argument in particular."""
    return {
        "json": json_values,
        "big-json": json_values,
        "unicode": st.one_of(odd_text, long_text(60000, MAX_VALUE_LENGTH)),
        "big-unicode": st.one_of(odd_text, long_text(60000, MAX_VALUE_LENGTH * 2)),
        "integer": odd_integers,
        "boolean": st.booleans(),
        "float": st.floats(),
        "bytes": st.binary(max_size=64),
        "big": st.binary(max_size=64),
    }[kind]


def _bad_encodings(kind: str):
    """Bytes that the argument's type must refuse (INVALID_REQUEST)."""
    if kind in ("json", "big-json"):
        return bad_json_bytes
    if kind in ("unicode", "big-unicode"):
        return invalid_utf8
    if kind == "integer":
        return bad_integer_bytes
    if kind == "boolean":
        return bad_boolean_bytes
    if kind == "float":
        return st.sampled_from([b"", b"x", b"1,5", b"\xff"])
    return st.nothing()


def _fits_one_value(kind: str, data: bytes) -> bool:
    return kind.startswith("big") or len(data) <= MAX_VALUE_LENGTH


def chunk_keys(name: bytes, data: bytes):
    """The box entries of a Big value, as the agent's own encoder would cut it."""
    if not data:
        return {name: b""}
    pieces = [data[i : i + MAX_VALUE_LENGTH] for i in range(0, len(data), MAX_VALUE_LENGTH)]
    return {name if index == 0 else name + b"." + str(index).encode(): piece for index, piece in enumerate(pieces)}


@st.composite
def _broken_chunks(draw, name: bytes, data: bytes):
    """A Big value's chunks with the sequence damaged: a gap, a lost head, odd suffixes."""
    entries = chunk_keys(name, data if len(data) > 1 else data + b"xy")
    damage = draw(st.sampled_from(["lose-head", "gap", "odd-suffix", "only-tail", "short-chunks"]))
    if damage == "lose-head":
        entries.pop(name)
        entries.setdefault(name + b".1", b"orphan")
    elif damage == "gap":
        entries[name + b".5"] = b"after a gap"
    elif damage == "odd-suffix":
        entries[name + draw(st.sampled_from([b".", b".x", b".-1", b".01", b"..1", b".1.1"]))] = b"odd"
    elif damage == "only-tail":
        entries = {name + b".1": data[:10] or b"x"}
    else:
        # Chunks shorter than the maximum are legal on the wire: the agent joins what it gets.
        entries = {
            name if i == 0 else name + b"." + str(i).encode(): data[i : i + 1] for i in range(min(len(data), 40))
        }
        entries.setdefault(name, b"")
    return entries


@st.composite
def argument_entries(draw, command, name: bytes, argument, kernel_ids=None, careful=False):
    """The box entries for one argument: usually well-formed, often not (never, when ``careful``)."""
    kind = argument_kind(argument)
    if careful:
        if argument.optional and draw(st.booleans()):
            return {}
        valid = _valid(command.commandName, name, kernel_ids)
        value = draw(valid if valid is not None else _generic_values(kind))
        data = _encode(kind, value)
        return chunk_keys(name, data) if kind.startswith("big") else {name: data}
    meaningful = _meaningful(command.commandName, name, kernel_ids)
    choices = ["meaningful"] * 6 if meaningful is not None else []
    choices += ["generic", "generic", "bad-encoding", "missing"]
    if kind.startswith("big"):
        choices += ["broken-chunks"]
    how = draw(st.sampled_from(choices))
    if how == "missing":
        return {}
    if how == "bad-encoding":
        data = draw(_bad_encodings(kind))
        if not data and kind in ("unicode", "big-unicode", "bytes", "big"):
            data = b"\xff"
    else:
        values = meaningful if how == "meaningful" else _generic_values(kind)
        value = draw(values)
        try:
            data = _encode(kind, value)
        except (TypeError, ValueError, AttributeError):
            # A value of the wrong Python type for this kind (e.g. a dict for Unicode):
            # send its JSON instead, which is wrong on the wire in its own way.
            data = dumps(value)
    if how == "broken-chunks":
        return draw(_broken_chunks(name, data))
    if kind.startswith("big"):
        return chunk_keys(name, data)
    if not _fits_one_value(kind, data):
        data = data[:MAX_VALUE_LENGTH]
    return {name: data}


extra_keys = st.dictionaries(
    st.one_of(
        st.binary(min_size=1, max_size=MAX_KEY_LENGTH),
        st.sampled_from([b"x", b"_private", b"kernel_id2", b"payload.1", b"__class__", b"\x00", b"a" * MAX_KEY_LENGTH]),
    ).filter(lambda key: key not in RESERVED_KEYS),
    st.binary(max_size=100),
    max_size=3,
)


@st.composite
def command_box(draw, command, kernel_ids=None, extras=True):
    """
    One box calling ``command`` (without ``_ask``). ``kernel_ids`` is a strategy of ids
    the agent knows, drawn as often as random ids are.
    """
    box = {amp.COMMAND: command.commandName}
    # Fuzz every argument, or just one of an otherwise careful call, or none: a box with
    # many bad arguments stops at the first check, and the deeper ones need good company.
    fuzzed = draw(st.sampled_from(["all", "one", "one", "none"]))
    victim = draw(st.sampled_from([name for name, _ in command.arguments])) if command.arguments else None
    for name, argument in command.arguments:
        careful = fuzzed == "none" or (fuzzed == "one" and name != victim)
        box.update(draw(argument_entries(command, name, argument, kernel_ids, careful)))
    if extras and draw(st.integers(0, 4)) == 0:
        for key, value in draw(extra_keys).items():
            box.setdefault(key, value)
    return box


def valid_box(command, **values):
    """The box a well-behaved manager would send (through the argument types themselves)."""
    strings = amp.AmpBox()
    for name, argument in command.arguments:
        python_name = amp._wireNameToPythonIdentifier(name)
        if values.get(python_name) is None:
            continue
        argument.toBox(name, strings, {python_name: values[python_name]}, None)
    strings[amp.COMMAND] = command.commandName
    return dict(strings)


FUZZED_COMMANDS = tuple(command for command in commands.MANAGER_TO_AGENT if command is not commands.Authenticate)


def any_command_box(kernel_ids=None, commands_to_draw=FUZZED_COMMANDS):
    return st.sampled_from(commands_to_draw).flatmap(lambda command: command_box(command, kernel_ids))


# -- the wire -------------------------------------------------------------------------------


def serialise(box: dict) -> bytes:
    """The AMP wire bytes of ``box``; keys and values must fit their length prefixes."""
    out = []
    for key, value in box.items():
        assert 0 < len(key) <= MAX_KEY_LENGTH and len(value) <= MAX_VALUE_LENGTH, (key[:40], len(value))
        out.append(len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value)
    out.append(b"\x00\x00")
    return b"".join(out)


def answer_problem(command, answer: dict):
    """
    What is wrong with ``answer`` (a box carrying ``_answer`` or ``_error``) as the answer
    to ``command``, or None when it keeps the contract: a response that parses with the
    command's declared response, or a declared error code.
    """
    if amp.ANSWER in answer:
        strings = {key: value for key, value in answer.items() if key != amp.ANSWER}
        try:
            command.parseResponse(strings, None)
        except Exception as e:
            return f"answer does not parse as a {command.commandName.decode()} response: {type(e).__name__}: {e}"
        return None
    if amp.ERROR not in answer:
        return f"neither an answer nor an error: {answer!r}"
    code = answer.get(amp.ERROR_CODE)
    description = answer.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
    declared = set(command.errors.values()) | COMMON_ERROR_CODES
    if code == amp.UNHANDLED_ERROR_CODE and command.commandName in MAY_BE_UNHANDLED:
        return None
    if code not in declared:
        return f"undeclared error code {code!r}: {description[:300]}"
    if "failed inside the agent" in description:
        # The server's catch-all turned an unexpected exception into BACKEND_UNAVAILABLE.
        return f"an unexpected exception inside the agent: {description[:500]}"
    return None


@implementer(amp.IBoxReceiver)
class RawManager:
    """
    The box receiver of a manager that speaks raw boxes (under an ``amp.BinaryBoxProtocol``):
    it sends what it is given, files answers by tag, and answers the agent's own commands
    (``Ping``, ``Event``) as a manager should, so that the agent never finds it silent.
    """

    def __init__(self):
        self.answers = {}
        self.lost = False
        self.sender = None
        self.waiting = {}
        self._tags = itertools.count(1)

    def startReceivingBoxes(self, sender):
        self.sender = sender

    def ampBoxReceived(self, box):
        if amp.COMMAND in box:
            if amp.ASK in box:
                answer = amp.AmpBox({amp.ANSWER: box[amp.ASK]})
                if box[amp.COMMAND] == commands.Ping.commandName:
                    answer[b"payload"] = box.get(b"payload", b"")
                self.sender.sendBox(answer)
            return
        tag = box.get(amp.ANSWER, box.get(amp.ERROR))
        self.answers[tag] = dict(box)
        waiter = self.waiting.pop(tag, None)
        if waiter is not None:
            waiter(self.answers.pop(tag))

    def stopReceivingBoxes(self, reason):
        self.lost = True
        waiting, self.waiting = self.waiting, {}
        for waiter in waiting.values():
            waiter(None)

    def send(self, box, ask=True) -> bytes:
        """Write ``box`` (with a fresh ``_ask`` unless ``ask`` is false); the tag."""
        tag = str(next(self._tags)).encode()
        if ask:
            box = {**box, amp.ASK: tag}
        self.sender.transport.write(serialise(box))
        return tag

    def when_answered(self, tag, callback):
        """Call ``callback(answer_box)`` when the answer to ``tag`` comes, or ``None`` on a lost connection."""
        if tag in self.answers:
            callback(self.answers.pop(tag))
        elif self.lost:
            callback(None)
        else:
            self.waiting[tag] = callback


def draw_examples(strategy, count: int, seed_value: int = 0) -> list:
    """``count`` values of ``strategy``, drawn now (no shrinking: the caller reports what fails)."""
    drawn = []

    @seed(seed_value)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value):
        drawn.append(value)

    collect()
    return drawn
