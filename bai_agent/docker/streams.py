"""
The byte streams the Docker daemon answers with, decoded incrementally and without I/O:

- ``DockerStreamDemultiplexer`` / ``demultiplex_docker_stream`` split the multiplexed
  stdout/stderr stream of containers without a TTY (logs, attach, exec);
- ``whole_lines`` regroups demultiplexed output so that no line of one stream is cut by
  output of another;
- ``JSONStreamDecoder`` decodes a stream of concatenated JSON values (``/events``,
  progress streams).

``DockerEngineClient`` (``bai_agent.docker.engine``) feeds them what the daemon sends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

#: The stream byte of a multiplexed frame's header, and what it names.
DOCKER_STREAM_NAMES = {0: "stdin", 1: "stdout", 2: "stderr"}

_FRAME_HEADER_SIZE = 8

#: Demultiplexed output: ``(stream_name, bytes)`` in the order written.
Output = list[tuple[str, bytes]]


class DockerStreamError(ValueError):
    """The bytes are not Docker's multiplexed stream (a frame header is invalid)."""


class DockerStreamDemultiplexer:
    """
    Incremental demultiplexer of the stream Docker sends for a container without a TTY:
    frames of an 8-byte header ``[stream, 0, 0, 0, size as big-endian uint32]`` and
    ``size`` bytes of output, where stream is 0 (stdin), 1 (stdout) or 2 (stderr).

    ``feed`` takes chunks cut anywhere, even inside a header, and returns the output
    they completed as ``[(stream_name, bytes)]``: a frame's bytes are passed on as soon
    as they arrive (an interactive consumer sees output without waiting for the rest of
    the frame), and consecutive bytes of the same stream within one ``feed`` are joined.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = ""  # the stream of the frame whose payload is arriving
        self._remaining = 0  # payload bytes of that frame still to come
        self._offset = 0  # bytes consumed so far, for error messages

    @property
    def pending(self) -> bool:
        """True when the stream stopped inside a frame (a truncated stream)."""
        return bool(self._header) or self._remaining > 0

    def feed(self, data: bytes) -> Output:
        out: list[tuple[str, bytearray]] = []
        view = memoryview(data)
        i, end = 0, len(view)
        while i < end:
            if self._remaining:
                take = min(self._remaining, end - i)
                _append_output(out, self._stream, view[i : i + take])
                self._remaining -= take
                i += take
                continue
            start = len(self._header)
            piece = view[i : i + _FRAME_HEADER_SIZE - start]
            self._header += piece
            self._check_header(start)
            i += len(piece)
            if len(self._header) == _FRAME_HEADER_SIZE:
                self._stream = DOCKER_STREAM_NAMES[self._header[0]]
                self._remaining = int.from_bytes(self._header[4:], "big")
                self._offset += _FRAME_HEADER_SIZE + self._remaining
                self._header.clear()
        return [(name, bytes(payload)) for name, payload in out]

    def _check_header(self, checked: int) -> None:
        """Validate the header bytes from ``checked`` on, as soon as they arrive."""
        header = self._header
        for index in range(checked, min(len(header), 4)):
            if (index == 0 and header[0] not in DOCKER_STREAM_NAMES) or (index and header[index]):
                raise DockerStreamError(
                    f"not a multiplexed stream: invalid frame header at byte {self._offset}: {bytes(header)!r}"
                )


def _append_output(out: list[tuple[str, bytearray]], name: str, payload: Iterable[int]) -> None:
    if out and out[-1][0] == name:
        out[-1][1].extend(payload)
    else:
        out.append((name, bytearray(payload)))


def demultiplex_docker_stream(data: bytes) -> Output:
    """
    Split Docker's multiplexed stream (see ``DockerStreamDemultiplexer``) into
    ``[(stream_name, bytes)]`` in the order written, ``stream_name`` being ``"stdin"``,
    ``"stdout"`` or ``"stderr"``. Consecutive output of one stream is joined into one
    item, so the result does not depend on how the writer framed it. A final frame cut
    short gives the bytes that did arrive; a final header cut short gives nothing.
    Raise ``DockerStreamError`` (a ``ValueError``) at a header that is not
    ``[0|1|2, 0, 0, 0, size]``, e.g. for the raw output of a container with a TTY.
    """
    return DockerStreamDemultiplexer().feed(data)


def whole_lines(output: Iterable[tuple[str, bytes]]) -> Output:
    """
    Regroup demultiplexed ``output`` (``[(stream_name, bytes)]``) so that no line of
    one stream is cut by output of another: each stream's bytes are held until a
    newline, and each line goes where its last byte came. The daemon logs a long line
    in 16 KiB pieces, and the pieces of stdout and stderr lines written close together
    interleave; this keeps them whole. A stream's unfinished last line comes at the end.
    """
    pending: dict[str, bytearray] = {}  # stream -> bytes held back, in the order they started
    out: list[tuple[str, bytearray]] = []
    for stream, payload in output:
        if not payload:
            continue
        held = pending.setdefault(stream, bytearray())
        held += payload
        end = held.rfind(b"\n") + 1
        if end:
            _append_output(out, stream, held[:end])
            del held[:end]
            if not held:
                del pending[stream]
    for stream, rest in pending.items():
        _append_output(out, stream, rest)
    return [(stream, bytes(payload)) for stream, payload in out]


class JSONStreamError(ValueError):
    """The stream is not a sequence of JSON objects/arrays."""


class JSONStreamDecoder:
    """
    Incremental decoder for a byte stream of concatenated JSON objects or arrays (the
    shape of Docker's ``/events`` and progress streams), fed chunks cut at arbitrary
    points, even inside a string or a multi-byte UTF-8 character.

    It scans each byte once, tracking nesting depth and whether it is inside a string;
    a value is decoded only when its closing bracket has arrived. Scanning the raw
    bytes is safe because UTF-8 continuation bytes never look like ASCII brackets,
    quotes or backslashes.
    """

    _STRUCTURE = re.compile(rb'[{}\[\]"]')
    _STRING_SPECIAL = re.compile(rb'["\\]')
    _NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")

    def __init__(self, max_value_size: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._scan = 0  # first byte not yet scanned
        self._depth = 0
        self._in_string = False
        self._max_value_size = max_value_size

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data`` (bytes); return the list of values it completed, in order."""
        buf = self._buffer
        buf += data
        values = []
        start = 0  # where the value being scanned begins (meaningful when depth > 0)
        i = self._scan
        end = len(buf)
        while i < end:
            if self._in_string:
                m = self._STRING_SPECIAL.search(buf, i)
                if m is None:
                    i = end
                elif buf[m.start()] == 0x5C:  # backslash: skip the escaped byte
                    if m.start() + 1 >= end:
                        i = m.start()  # rescan the backslash when more arrives
                        break
                    i = m.start() + 2
                else:
                    self._in_string = False
                    i = m.end()
            elif self._depth == 0:
                m = self._NOT_WHITESPACE.search(buf, i)
                if m is None:
                    i = end
                elif buf[m.start()] in b"{[":
                    start = m.start()
                    self._depth = 1
                    i = m.end()
                else:
                    raise JSONStreamError(f"expected a JSON object, found {bytes(buf[m.start() : m.start() + 20])!r}")
            else:
                m = self._STRUCTURE.search(buf, i)
                if m is None:
                    i = end
                    continue
                byte = buf[m.start()]
                i = m.end()
                if byte == 0x22:  # '"'
                    self._in_string = True
                elif byte in b"{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        values.append(self._decode(bytes(buf[start:i])))
                        start = i
        # Keep only the unfinished value (or nothing) and where scanning stopped in it.
        keep_from = start if self._depth or self._in_string else i
        del buf[:keep_from]
        self._scan = i - keep_from
        if len(buf) > self._max_value_size:
            raise JSONStreamError(f"a JSON value is larger than {self._max_value_size} bytes")
        return values

    def _decode(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise JSONStreamError(f"invalid JSON in stream: {e}") from None

    @property
    def pending(self) -> bool:
        """True when the stream stopped inside a value (a truncated stream)."""
        return self._depth > 0 or self._in_string
