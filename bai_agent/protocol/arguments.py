"""
AMP argument types of the wire contract (PROTOCOL.md section 1).

``Json`` is one AMP value holding UTF-8 JSON. ``Big`` values may exceed AMP's 64 KiB value
limit: their bytes are cut into chunks of at most 65,535 bytes, the first under the
argument's own key and the next ones under ``key.1``, ``key.2``, ... in order.
"""

import json

from twisted.protocols import amp

MAX_VALUE_LENGTH = 0xFFFF


def split_chunks(data: bytes):
    """Cut ``data`` into AMP-sized chunks; an empty value is one empty chunk."""
    if not data:
        return [b""]
    return [data[i : i + MAX_VALUE_LENGTH] for i in range(0, len(data), MAX_VALUE_LENGTH)]


def _chunk_key(name: bytes, index: int) -> bytes:
    return name if index == 0 else name + b"." + str(index).encode("ascii")


class Big(amp.Argument):
    """Raw bytes of any length, chunked over several AMP keys."""

    def toBox(self, name, strings, objects, proto):
        value = self.retrieve(objects, _pythonName(name), proto)
        if value is None and self.optional:
            return
        for index, chunk in enumerate(split_chunks(self.toBytes(value))):
            strings[_chunk_key(name, index)] = chunk

    def fromBox(self, name, strings, objects, proto):
        chunks = []
        index = 0
        while True:
            key = _chunk_key(name, index)
            if key not in strings:
                break
            chunks.append(strings.pop(key))
            index += 1
        if not chunks:
            if self.optional:
                objects[_pythonName(name)] = None
                return
            raise KeyError(name)
        objects[_pythonName(name)] = self.fromBytes(b"".join(chunks))

    def toBytes(self, value):
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"Big bytes value expected, got {type(value).__name__}")
        return bytes(value)

    def fromBytes(self, data):
        return data


class BigUnicode(Big):
    """UTF-8 text of any length."""

    def toBytes(self, value):
        if not isinstance(value, str):
            raise TypeError(f"Big Unicode value expected, got {type(value).__name__}")
        return value.encode("utf-8")

    def fromBytes(self, data):
        return data.decode("utf-8")


class RawJson:
    """
    A JSON document already encoded (UTF-8 bytes), sent as is where a ``Json`` or
    ``BigJson`` value is expected: for output the agent passes on without decoding.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def value(self):
        return _load_json(self.data)

    def __eq__(self, other):
        return self.value() == (other.value() if isinstance(other, RawJson) else other)

    def __repr__(self):
        return f"RawJson({self.data[:60]!r}{'...' if len(self.data) > 60 else ''})"


def _dump_json(value) -> bytes:
    if isinstance(value, RawJson):
        return value.data
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _load_json(data: bytes):
    # NaN and Infinity are not JSON: a manager sending them gets INVALID_REQUEST.
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class BigJson(Big):
    """A JSON document of any size, as UTF-8 bytes."""

    def toBytes(self, value):
        return _dump_json(value)

    def fromBytes(self, data):
        return _load_json(data)


class Json(amp.Argument):
    """A JSON document in one AMP value (at most 64 KiB)."""

    def toString(self, inObject):
        return _dump_json(inObject)

    def fromString(self, inString):
        return _load_json(inString)


def _pythonName(name: bytes) -> str:
    return amp._wireNameToPythonIdentifier(name)
