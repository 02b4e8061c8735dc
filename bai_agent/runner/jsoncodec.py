"""
JSON for the runner: the standard ``json`` module when the image has it, else a small
pure-Python codec with the same results for the values the runner exchanges (dict with
str keys, list, str, int, float, bool, None).

Debian's ``python3-minimal`` (a common base of kernel images) ships without ``json``,
and the runner must work there: it brings this fallback instead of depending on it.

``dumps`` writes compact JSON with non-ASCII text as is (``ensure_ascii=False``);
``loads`` raises ``ValueError`` for anything that is not one well-formed JSON document.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any, NoReturn

try:  # pragma: no cover - which branch runs depends on the image
    import json as _json
except ImportError:  # pragma: no cover
    _json = None  # type: ignore[assignment]

#: Nesting deeper than this is refused by the fallback decoder (the runner's own
#: messages nest two levels; this only guards the recursion).
MAX_DEPTH = 64


# -- encoder ------------------------------------------------------------------------

_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')
_CONTROL = re.compile(r"[\x00-\x1f]")


def _control_escape(match):
    return f"\\u{ord(match.group()):04x}"


def _encode_str(text):
    if _NEEDS_ESCAPE.search(text) is None:
        return '"' + text + '"'
    # str.replace runs in C: handle the common escapes that way, the rare control
    # characters with a regex.
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if _CONTROL.search(text) is not None:
        text = _CONTROL.sub(_control_escape, text)
    return '"' + text + '"'


def _encode(value, parts, depth):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if isinstance(value, str):
        parts.append(_encode_str(value))
    elif value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int):
        parts.append(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("out of range float values are not JSON compliant")
        parts.append(float.__repr__(value))
    elif isinstance(value, dict):
        parts.append("{")
        first = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            if not first:
                parts.append(",")
            first = False
            parts.append(_encode_str(key))
            parts.append(":")
            _encode(item, parts, depth + 1)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _encode(item, parts, depth + 1)
        parts.append("]")
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def py_dumps(value: object) -> str:
    """The pure-Python encoder (public for tests)."""
    parts: list = []
    _encode(value, parts, 0)
    return "".join(parts)


# -- decoder ------------------------------------------------------------------------

#: Matches at every position, so its ``match`` is never None.
_WHITESPACE: Any = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_STRING_CHUNK = re.compile(r'([^"\\\x00-\x1f]*)(["\\\x00-\x1f])')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_CONSTANTS = (("true", True), ("false", False), ("null", None))


def _fail(message: str, pos: int) -> NoReturn:
    raise ValueError(f"{message} at char {pos}")


def _decode_string(text, pos):
    """Decode the string whose opening quote is just before ``pos``."""
    chunks = []
    while True:
        match = _STRING_CHUNK.match(text, pos)
        if match is None:
            _fail("unterminated string", pos)
        content, terminator = match.groups()
        if content:
            chunks.append(content)
        pos = match.end()
        if terminator == '"':
            return "".join(chunks), pos
        if terminator != "\\":
            _fail("invalid control character in string", pos - 1)
        escape = text[pos : pos + 1]
        if escape in _SIMPLE_ESCAPES:
            chunks.append(_SIMPLE_ESCAPES[escape])
            pos += 1
            continue
        if escape != "u" or not _HEX4.match(text, pos + 1):
            _fail("invalid escape", pos)
        code = int(text[pos + 1 : pos + 5], 16)
        pos += 5
        # A UTF-16 surrogate pair written as two escapes is one character.
        if 0xD800 <= code <= 0xDBFF and text[pos : pos + 2] == "\\u" and _HEX4.match(text, pos + 2):
            low = int(text[pos + 2 : pos + 6], 16)
            if 0xDC00 <= low <= 0xDFFF:
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                pos += 6
        chunks.append(chr(code))


def _decode_value(text, pos, depth):
    if depth > MAX_DEPTH:
        _fail("document nested too deeply", pos)
    pos = _WHITESPACE.match(text, pos).end()
    char = text[pos : pos + 1]
    if char == '"':
        return _decode_string(text, pos + 1)
    if char == "{":
        members: dict = {}
        pos = _WHITESPACE.match(text, pos + 1).end()
        if text[pos : pos + 1] == "}":
            return members, pos + 1
        while True:
            if text[pos : pos + 1] != '"':
                _fail("expecting property name in double quotes", pos)
            key, pos = _decode_string(text, pos + 1)
            pos = _WHITESPACE.match(text, pos).end()
            if text[pos : pos + 1] != ":":
                _fail("expecting ':' delimiter", pos)
            members[key], pos = _decode_value(text, pos + 1, depth + 1)
            pos = _WHITESPACE.match(text, pos).end()
            char = text[pos : pos + 1]
            if char == "}":
                return members, pos + 1
            if char != ",":
                _fail("expecting ',' delimiter", pos)
            pos = _WHITESPACE.match(text, pos + 1).end()
    if char == "[":
        items: list = []
        pos = _WHITESPACE.match(text, pos + 1).end()
        if text[pos : pos + 1] == "]":
            return items, pos + 1
        while True:
            item, pos = _decode_value(text, pos, depth + 1)
            items.append(item)
            pos = _WHITESPACE.match(text, pos).end()
            char = text[pos : pos + 1]
            if char == "]":
                return items, pos + 1
            if char != ",":
                _fail("expecting ',' delimiter", pos)
            pos += 1
    match = _NUMBER.match(text, pos)
    if match is not None and match.end() > pos:
        integer, fraction, exponent = match.groups()
        if fraction or exponent:
            return float(integer + (fraction or "") + (exponent or "")), match.end()
        return int(integer), match.end()
    for word, value in _CONSTANTS:
        if text.startswith(word, pos):
            return value, pos + len(word)
    _fail("expecting value", pos)


def py_loads(text: str) -> Any:
    """The pure-Python decoder (public for tests)."""
    if not isinstance(text, str):
        raise TypeError("py_loads takes str")
    value, pos = _decode_value(text, 0, 0)
    pos = _WHITESPACE.match(text, pos).end()
    if pos != len(text):
        _fail("extra data", pos)
    return value


# -- the API the runner uses --------------------------------------------------------

if _json is not None:  # pragma: no branch

    def dumps(value: object) -> str:
        return _json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def loads(text: str) -> Any:
        try:
            return _json.loads(text)
        except RecursionError:
            raise ValueError("document nested too deeply") from None

    IMPLEMENTATION = "json"
else:  # pragma: no cover - exercised in minimal images (functional tests)
    dumps = py_dumps
    loads = py_loads
    IMPLEMENTATION = "fallback"
