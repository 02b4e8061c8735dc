"""bai_agent.protocol.console: the typed reading of an Execute answer's console."""

import base64

import pytest

from bai_agent.protocol.console import Html, Media, Output, console_text, parse_console

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\0" * 8


def test_items_are_typed_in_order():
    png = base64.b64encode(PNG_BYTES).decode()
    items = parse_console(
        [
            ["stdout", "before\n"],
            ["media", ["image/png", png]],
            ["html", "<table></table>"],
            ["stderr", "warn\n"],
            ["media", ["image/svg+xml", "<svg/>"]],
            ["stdout", "after\n"],
        ]
    )
    assert items == [
        Output("stdout", "before\n"),
        Media("image/png", png),
        Html("<table></table>"),
        Output("stderr", "warn\n"),
        Media("image/svg+xml", "<svg/>"),
        Output("stdout", "after\n"),
    ]
    assert items[1].content == PNG_BYTES and items[1].suffix == ".png"
    assert items[4].content == b"<svg/>" and items[4].suffix == ".svg"
    assert console_text(items) == "before\nafter\n"
    assert console_text(items, "stderr") == "warn\n"


@pytest.mark.parametrize(
    "console, message",
    [
        ({"stdout": "x"}, "is a list"),
        ([["stdout"]], r"\[type, data\]"),
        ([["stdout", 1]], "must be text"),
        ([["html", None]], "must be text"),
        ([["media", "image/png"]], r"\[mime, data\]"),
        ([["media", ["image/gif", "R0lG"]]], "unknown media type"),
        ([["media", ["image/png", "not base64!"]]], "not base64"),
        ([["video", "x"]], "unknown console item type"),
    ],
)
def test_a_bad_item_is_a_value_error_saying_what(console, message):
    with pytest.raises(ValueError, match=message):
        parse_console(console)
