"""The runner's frame format and its JSON codec (with the pure-Python fallback)."""

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bai_agent.runner import framing, jsoncodec
from bai_agent.runner.framing import MAX_FRAME, FrameDecoder, FrameError, decode_message, encode


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def test_encode_is_length_prefixed_utf8_json():
    data = encode({"type": "output", "data": "héllo"})
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    assert json.loads(data[4:].decode("utf-8")) == {"type": "output", "data": "héllo"}


def test_encode_replaces_lone_surrogates_instead_of_failing():
    data = encode({"type": "output", "data": "a\udc80b"})
    assert decode_message(data[4:]) == {"type": "output", "data": "a?b"}


def test_encode_refuses_a_frame_over_the_limit():
    with pytest.raises(FrameError):
        encode({"type": "output", "data": "x" * 100}, max_frame=50)


def test_decoder_returns_whole_frames_only():
    decoder = FrameDecoder()
    data = encode({"type": "ping", "id": 1}) + encode({"type": "ping", "id": 2})
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:10]) == []
    assert decoder.feed(data[10:-1]) == [{"type": "ping", "id": 1}]
    assert decoder.feed(data[-1:]) == [{"type": "ping", "id": 2}]
    assert decoder.buffered == 0


def test_decoder_byte_by_byte():
    messages = [{"type": "output", "data": "é" * n} for n in range(5)]
    data = b"".join(encode(m) for m in messages)
    decoder = FrameDecoder()
    received = []
    for i in range(len(data)):
        received += decoder.feed(data[i : i + 1])
    assert received == messages


def test_oversize_length_is_refused_before_the_body_arrives():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed(struct.pack(">I", 1025))
    assert decoder.broken
    with pytest.raises(FrameError):
        decoder.feed(encode({"type": "ping"}))


def test_default_limit_is_8_mib():
    assert MAX_FRAME == 8 * 1024 * 1024
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(struct.pack(">I", MAX_FRAME + 1))
    big = encode({"type": "input", "data": "x" * (MAX_FRAME - 100)})
    assert FrameDecoder().feed(big)[0]["data"] == "x" * (MAX_FRAME - 100)


def test_frames_before_a_bad_one_are_kept_on_the_error():
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(encode({"type": "ping", "id": 1}) + frame(b"not json"))
    assert info.value.messages == [{"type": "ping", "id": 1}]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"no_type": 1}',
        b'{"type": 3}',
        b"",
        b'{"type": "a"} x',
    ],
)
def test_malformed_payloads_are_frame_errors(payload):
    with pytest.raises(FrameError):
        FrameDecoder().feed(frame(payload))


def test_raw_payload_mode_returns_bytes():
    decoder = FrameDecoder(messages=False)
    assert decoder.feed(frame(b"\x01oabc") + frame(b"{}")) == [b"\x01oabc", b"{}"]


def test_long_streams_of_small_frames_compact_the_buffer():
    decoder = FrameDecoder()
    one = encode({"type": "ping", "id": 0})
    for _ in range(3):
        assert len(decoder.feed(one * 10000)) == 10000
    assert decoder.buffered == 0


# -- the fallback JSON codec (images with python3-minimal have no json module) -----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_fallback_encoder_output_is_what_json_reads(value):
    assert json.loads(jsoncodec.py_dumps(value)) == value


@given(json_values)
def test_fallback_decoder_reads_what_json_writes(value):
    for text in (
        json.dumps(value),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, indent=2),
    ):
        assert jsoncodec.py_loads(text) == value


@given(st.text())
def test_fallback_round_trips_any_text(text):
    assert jsoncodec.py_loads(jsoncodec.py_dumps({"type": "output", "data": text})) == {
        "type": "output",
        "data": text,
    }


def test_fallback_matches_json_byte_for_byte_on_runner_messages():
    message = {"type": "output", "run_id": "r1", "stream": "stdout", "data": 'a"b\\c\n\t\x00é€😀'}
    expected = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    assert jsoncodec.py_dumps(message) == expected


def test_fallback_decodes_surrogate_pair_escapes():
    assert jsoncodec.py_loads('"\\ud83d\\ude00"') == "😀"
    assert jsoncodec.py_loads('"\\udc80"') == "\udc80"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"a" 1}',
        '{"a": 1,}',
        "[1,]",
        '"\\x"',
        '"a\nb"',
        "01",
        "1.",
        "-",
        "tru",
        "[1] [2]",
        "{'a': 1}",
    ],
)
def test_fallback_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsoncodec.py_loads(text)


def test_fallback_refuses_deep_nesting_without_recursion_error():
    with pytest.raises(ValueError):
        jsoncodec.py_loads("[" * 10000 + "]" * 10000)


def test_deep_nesting_is_a_frame_error_with_either_codec():
    with pytest.raises(FrameError):
        FrameDecoder().feed(frame(b'{"type": "x", "a": ' + b"[" * 100000 + b"]" * 100000 + b"}"))


def test_fallback_refuses_values_json_cannot_carry():
    with pytest.raises(ValueError):
        jsoncodec.py_dumps(float("nan"))
    with pytest.raises(TypeError):
        jsoncodec.py_dumps({1: "a"})
    with pytest.raises(TypeError):
        jsoncodec.py_dumps(object())


def test_framing_uses_the_shared_codec():
    assert framing.jsoncodec is jsoncodec
