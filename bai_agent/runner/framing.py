"""
The runner's frame format, shared by the runner, its interpreter child and the agent's
``RunnerLink``: each frame is a 4-byte big-endian unsigned length followed by that many
bytes of payload. Between the agent and the runner the payload is always one UTF-8 JSON
object with a string ``type``.

``FrameDecoder`` is incremental (feed it whatever the socket gave) and refuses a frame
longer than its limit as soon as the length prefix says so, without buffering the body.
"""

from __future__ import annotations

import struct

try:  # imported as bai_agent.runner.framing (the agent, tests)
    from . import jsoncodec
except ImportError:  # run from the mounted directory, where siblings are top-level
    import jsoncodec  # type: ignore[no-redef]

#: The largest payload either side accepts (8 MiB).
MAX_FRAME = 8 * 1024 * 1024

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class FrameError(ValueError):
    """The peer sent a frame that is too large or is not a JSON object with a type."""

    #: The good frames decoded before the bad one (set by ``FrameDecoder.feed``).
    messages: list


def encode_payload(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """One frame around ``payload`` (bytes)."""
    if len(payload) > max_frame:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the limit of {max_frame}")
    return _HEADER.pack(len(payload)) + payload


def encode(message: dict, max_frame: int = MAX_FRAME) -> bytes:
    """One frame carrying ``message`` (a dict) as UTF-8 JSON."""
    # "replace": a lone surrogate in some text (user output can hold one) becomes "?"
    # instead of making the whole message unencodable.
    return encode_payload(jsoncodec.dumps(message).encode("utf-8", "replace"), max_frame)


def decode_message(payload: bytes) -> dict:
    """The message (a dict with a str ``type``) in one payload; ``FrameError`` if none."""
    try:
        message = jsoncodec.loads(bytes(payload).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError(f"malformed frame: {e}") from e
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise FrameError("a frame must hold a JSON object with a string 'type'")
    return message


class FrameDecoder:
    """
    Incremental frame splitter. ``feed(data)`` returns the complete payloads (bytes)
    received so far, or, with ``messages=True`` (the default), the decoded messages.
    After a ``FrameError`` (whose ``messages`` attribute holds what came before the bad
    frame) the decoder is unusable: the stream has lost its framing.
    """

    def __init__(self, max_frame: int = MAX_FRAME, messages: bool = True) -> None:
        self.max_frame = max_frame
        self._messages = messages
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> list:
        if self.broken:
            raise FrameError("the stream already had a bad frame")
        self._buffer += data
        results = []
        buffer = self._buffer
        try:
            while len(buffer) - self._start >= HEADER_SIZE:
                (size,) = _HEADER.unpack_from(buffer, self._start)
                if size > self.max_frame:
                    raise FrameError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
                end = self._start + HEADER_SIZE + size
                if len(buffer) < end:
                    break
                with memoryview(buffer) as view:
                    payload = bytes(view[self._start + HEADER_SIZE : end])
                self._start = end
                results.append(decode_message(payload) if self._messages else payload)
        except FrameError as e:
            # The frames before the bad one were good: hand them over with the error.
            self.broken = True
            e.messages = results
            raise
        # Compact once the consumed part dominates, so that a long stream of small
        # frames costs linear time and the buffer never holds more than one frame.
        if self._start and (self._start == len(buffer) or self._start > 65536):
            del buffer[: self._start]
            self._start = 0
        return results
