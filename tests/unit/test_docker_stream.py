"""
``demultiplex_docker_stream`` and ``DockerStreamDemultiplexer``: Docker's multiplexed
stdout/stderr stream (8-byte headers ``[stream, 0, 0, 0, size as big-endian uint32]``);
``whole_lines``, which keeps lines whole when the streams interleave.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bai_agent.docker.streams import (
    DockerStreamDemultiplexer,
    DockerStreamError,
    demultiplex_docker_stream,
    whole_lines,
)

STREAM_BYTES = {"stdin": 0, "stdout": 1, "stderr": 2}


def frame(stream, payload):
    return bytes([STREAM_BYTES[stream], 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def joined(frames):
    """What the demultiplexer promises: consecutive output of one stream joined, none empty."""
    result = []
    for stream, payload in frames:
        if not payload:
            continue
        if result and result[-1][0] == stream:
            result[-1] = (stream, result[-1][1] + payload)
        else:
            result.append((stream, payload))
    return result


def test_interleaved_stdout_and_stderr_come_back_in_order():
    data = frame("stdout", b"out\n") + frame("stderr", b"err\n") + frame("stdout", b"again\n")
    assert demultiplex_docker_stream(data) == [
        ("stdout", b"out\n"),
        ("stderr", b"err\n"),
        ("stdout", b"again\n"),
    ]


def test_the_real_daemons_answer_for_the_print_command():
    # GET /containers/{id}/logs of PRINT_CMD, as Docker 20.10 sent it.
    data = b"\x01\x00\x00\x00\x00\x00\x00\x04out\n\x02\x00\x00\x00\x00\x00\x00\x04err\n"
    assert demultiplex_docker_stream(data) == [("stdout", b"out\n"), ("stderr", b"err\n")]


def test_consecutive_frames_of_one_stream_are_joined():
    # A line the writer split over two writes (two frames) comes back whole.
    data = frame("stdout", b"hello, ") + frame("stdout", b"world\n") + frame("stderr", b"!")
    assert demultiplex_docker_stream(data) == [("stdout", b"hello, world\n"), ("stderr", b"!")]


def test_empty_input_and_empty_frames_give_nothing():
    assert demultiplex_docker_stream(b"") == []
    assert demultiplex_docker_stream(frame("stdout", b"")) == []
    data = frame("stdout", b"a") + frame("stderr", b"") + frame("stdout", b"b")
    assert demultiplex_docker_stream(data) == [("stdout", b"ab")]


def test_stdin_frames_are_named():
    assert demultiplex_docker_stream(frame("stdin", b"typed")) == [("stdin", b"typed")]


def test_payload_bytes_that_look_like_headers_are_payload():
    payload = frame("stderr", b"nested") + b"\x00" * 9
    assert demultiplex_docker_stream(frame("stdout", payload)) == [("stdout", payload)]


def test_a_large_frame_is_read_by_its_size():
    payload = bytes(range(256)) * 1024  # 256 KiB, every byte value
    data = frame("stderr", payload) + frame("stdout", b"tail")
    assert demultiplex_docker_stream(data) == [("stderr", payload), ("stdout", b"tail")]


def test_a_truncated_final_payload_gives_the_bytes_that_arrived():
    data = frame("stdout", b"whole\n") + frame("stderr", b"cut short here")[:-5]
    assert demultiplex_docker_stream(data) == [("stdout", b"whole\n"), ("stderr", b"cut short")]


@pytest.mark.parametrize("header_bytes", range(1, 8))
def test_a_truncated_final_header_gives_nothing_more(header_bytes):
    data = frame("stdout", b"whole\n") + frame("stderr", b"lost")[:header_bytes]
    assert demultiplex_docker_stream(data) == [("stdout", b"whole\n")]


def test_a_header_with_no_payload_yet_gives_nothing_more():
    data = frame("stdout", b"whole\n") + frame("stderr", b"lost")[:8]
    assert demultiplex_docker_stream(data) == [("stdout", b"whole\n")]


@pytest.mark.parametrize(
    "data",
    [
        b"out\r\nerr\r\n",  # what a container with a TTY sends: raw terminal output
        b"\x03\x00\x00\x00\x00\x00\x00\x01x",  # no stream 3
        b"\x01\x00\x01\x00\x00\x00\x00\x01x",  # padding not zero
        b"\x01\x00\x00\x00\x00\x00\x00\x01x" + b"\x01\x00\x00\x07",  # bad second header, cut
        b"{",  # one byte is enough to tell
    ],
)
def test_what_is_not_a_multiplexed_stream_is_refused(data):
    with pytest.raises(DockerStreamError, match="not a multiplexed stream"):
        demultiplex_docker_stream(data)


def test_the_error_says_where_the_bad_header_is():
    data = frame("stdout", b"12345") + b"garbage!"
    with pytest.raises(DockerStreamError, match="at byte 13"):
        demultiplex_docker_stream(data)
    assert issubclass(DockerStreamError, ValueError)


def test_incremental_feeding_byte_by_byte_passes_output_on_at_once():
    data = frame("stdout", b"out\n") + frame("stderr", b"err\n")
    demultiplexer = DockerStreamDemultiplexer()
    got = []
    for i in range(len(data)):
        got.extend(demultiplexer.feed(data[i : i + 1]))
        if i == 8:  # the first payload byte: delivered without waiting for the frame
            assert got == [("stdout", b"o")]
    assert joined(got) == [("stdout", b"out\n"), ("stderr", b"err\n")]
    assert not demultiplexer.pending


def test_pending_tells_a_stream_stopped_inside_a_frame():
    demultiplexer = DockerStreamDemultiplexer()
    assert not demultiplexer.pending
    demultiplexer.feed(frame("stdout", b"abc")[:3])
    assert demultiplexer.pending  # inside a header
    demultiplexer.feed(frame("stdout", b"abc")[3:10])
    assert demultiplexer.pending  # inside a payload
    assert demultiplexer.feed(b"c") == [("stdout", b"c")]
    assert not demultiplexer.pending


def test_a_utf8_character_split_over_two_frames_survives():
    snow = "雪".encode()
    data = frame("stdout", snow[:1]) + frame("stdout", snow[1:])
    [(stream, payload)] = demultiplex_docker_stream(data)
    assert (stream, payload.decode("utf-8")) == ("stdout", "雪")


frames_strategy = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr", "stdin"]), st.binary(max_size=40)), max_size=8
)


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_any_chunking_gives_the_same_output_as_the_whole(frames, cuts):
    data = b"".join(frame(stream, payload) for stream, payload in frames)
    assert demultiplex_docker_stream(data) == joined(frames)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    demultiplexer = DockerStreamDemultiplexer()
    got = []
    for start, end in zip(points, points[1:]):
        got.extend(demultiplexer.feed(data[start:end]))
    assert joined(got) == joined(frames)
    assert not demultiplexer.pending


@given(frames=frames_strategy, cut=st.integers(min_value=0, max_value=400))
def test_truncation_anywhere_gives_a_prefix_of_the_output(frames, cut):
    data = b"".join(frame(stream, payload) for stream, payload in frames)
    truncated = data[: min(cut, len(data))]
    got = demultiplex_docker_stream(truncated)
    expected = joined(frames)
    # Same streams in order, each chunk a prefix of the full one, the last possibly shorter.
    assert len(got) <= len(expected)
    for i, (stream, payload) in enumerate(got):
        assert stream == expected[i][0]
        if i < len(got) - 1:
            assert payload == expected[i][1]
        else:
            assert expected[i][1].startswith(payload)


# -- whole_lines: keeping lines whole across interleaved streams --------------------


def test_whole_lines_keeps_a_long_line_whole_where_it_ended():
    # As the daemon logs a 40 KB stdout line with a stderr line written in between.
    output = [
        ("stdout", b"x" * 16384),
        ("stdout", b"x" * 16384),
        ("stderr", b"err\n"),
        ("stdout", b"x" * 7232 + b"\n"),
    ]
    assert whole_lines(output) == [("stderr", b"err\n"), ("stdout", b"x" * 40000 + b"\n")]


def test_whole_lines_leaves_line_by_line_output_alone():
    output = [("stdout", b"out\n"), ("stderr", b"err\n"), ("stdout", b"a\nb\n")]
    assert whole_lines(output) == output


def test_whole_lines_splits_a_piece_at_its_last_newline():
    output = [("stdout", b"one\ntw"), ("stderr", b"err\n"), ("stdout", b"o\n")]
    assert whole_lines(output) == [("stdout", b"one\n"), ("stderr", b"err\n"), ("stdout", b"two\n")]


def test_whole_lines_puts_unfinished_lines_last_in_the_order_they_started():
    output = [("stderr", b"no newline"), ("stdout", b"half"), ("stdout", b" done\nrest")]
    assert whole_lines(output) == [
        ("stdout", b"half done\n"),
        ("stderr", b"no newline"),
        ("stdout", b"rest"),
    ]


@given(frames=frames_strategy)
def test_whole_lines_keeps_every_byte_of_every_stream(frames):
    regrouped = whole_lines(frames)
    for stream in ("stdin", "stdout", "stderr"):
        assert b"".join(p for s, p in regrouped if s == stream) == b"".join(p for s, p in frames if s == stream)
    # Every item but each stream's last holds whole lines.
    last = {s: i for i, (s, _) in enumerate(regrouped)}
    for i, (stream, payload) in enumerate(regrouped):
        assert payload
        if i != last[stream]:
            assert payload.endswith(b"\n")
