"""
AMP argument types of the wire contract (PROTOCOL.md section 1).

``Json`` is one AMP value holding UTF-8 JSON. ``Big`` values may exceed AMP's 64 KiB value
limit: their bytes are cut into chunks of at most 65,535 bytes, the first under the
argument's own key and the next ones under ``key.1``, ``key.2``, ... in order.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, Protocol

from twisted.protocols import amp


class ArgumentType(Protocol):
    """What makes an AMP argument: an ``amp.Argument`` subclass."""

    def __call__(self, optional: bool = False) -> amp.Argument: ...


# Twisted's own argument types, under the names the commands use. The classes are Twisted's
# (their constructors are unannotated); these names give them a type.
Boolean: ArgumentType = amp.Boolean
Float: ArgumentType = amp.Float
Integer: ArgumentType = amp.Integer
String: ArgumentType = amp.String
Unicode: ArgumentType = amp.Unicode

#: What AMP hands an argument's toBox/fromBox: the wire box (``bytes`` keys and values)
#: and the Python-side dict of values, keyed by Python names.
Strings = dict[bytes, bytes]
Objects = dict[str, Any]

MAX_VALUE_LENGTH = 0xFFFF


def split_chunks(data: bytes) -> list[bytes]:
    """Cut ``data`` into AMP-sized chunks; an empty value is one empty chunk."""
    if not data:
        return [b""]
    return [data[i : i + MAX_VALUE_LENGTH] for i in range(0, len(data), MAX_VALUE_LENGTH)]


def _chunk_key(name: bytes, index: int) -> bytes:
    return name if index == 0 else name + b"." + str(index).encode("ascii")


class Big(amp.Argument):
    """Raw bytes of any length, chunked over several AMP keys."""

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)  # type: ignore[no-untyped-call]  # twisted.protocols.amp is unannotated

    def toBox(self, name: bytes, strings: Strings, objects: Objects, proto: amp.AMP | None) -> None:
        value = self.retrieve(objects, _pythonName(name), proto)  # type: ignore[no-untyped-call]  # as above
        if value is None and self.optional:
            return
        for index, chunk in enumerate(split_chunks(self.toBytes(value))):
            strings[_chunk_key(name, index)] = chunk

    def fromBox(self, name: bytes, strings: Strings, objects: Objects, proto: amp.AMP | None) -> None:
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

    def toBytes(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"Big bytes value expected, got {type(value).__name__}")
        return bytes(value)

    def fromBytes(self, data: bytes) -> Any:
        return data


class BigUnicode(Big):
    """UTF-8 text of any length."""

    def toBytes(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"Big Unicode value expected, got {type(value).__name__}")
        return value.encode("utf-8")

    def fromBytes(self, data: bytes) -> str:
        return data.decode("utf-8")


class RawJson:
    """
    A JSON document already encoded (UTF-8 bytes), sent as is where a ``Json`` or
    ``BigJson`` value is expected: for output the agent passes on without decoding.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def value(self) -> Any:
        return _load_json(self.data)

    def __eq__(self, other: object) -> bool:
        equal: bool = self.value() == (other.value() if isinstance(other, RawJson) else other)
        return equal

    def __repr__(self) -> str:
        return f"RawJson({self.data[:60]!r}{'...' if len(self.data) > 60 else ''})"


def _dump_json(value: Any) -> bytes:
    if isinstance(value, RawJson):
        return value.data
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _load_json(data: bytes) -> Any:
    # NaN and Infinity are not JSON: a manager sending them gets INVALID_REQUEST.
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class BigJson(Big):
    """A JSON document of any size, as UTF-8 bytes."""

    def toBytes(self, value: Any) -> bytes:
        return _dump_json(value)

    def fromBytes(self, data: bytes) -> Any:
        return _load_json(data)


class Json(amp.Argument):
    """A JSON document in one AMP value (at most 64 KiB)."""

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)  # type: ignore[no-untyped-call]  # twisted.protocols.amp is unannotated

    def toString(self, inObject: Any) -> bytes:
        return _dump_json(inObject)

    def fromString(self, inString: bytes) -> Any:
        return _load_json(inString)


def _pythonName(name: bytes) -> str:
    python_name: str = amp._wireNameToPythonIdentifier(name)  # type: ignore[no-untyped-call]  # unannotated
    return python_name
