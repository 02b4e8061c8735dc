"""
The items of an ``Execute`` answer's ``console`` (PROTOCOL.md sections 2 and 10), typed.

On the wire the console is an ordered list of ``[type, data]``:

- ``["stdout", TEXT]``, ``["stderr", TEXT]``: what the code wrote;
- ``["media", [MIME, DATA]]``: a picture, ``image/png`` as base64 text, ``image/svg+xml``
  as the SVG's text;
- ``["html", HTML_TEXT]``: a rich representation (a pandas DataFrame's table, ...).

``parse_console`` turns that list into ``Output``, ``Media`` and ``Html`` values, in order,
and refuses (``ValueError``) anything that is not one of them, so that a manager never has
to guess at shapes. ``Media.content`` gives a picture's bytes.
"""

from __future__ import annotations

import base64
import binascii
from typing import Union

import attrs

STDOUT = "stdout"
STDERR = "stderr"
MEDIA = "media"
HTML = "html"
#: The console item types, in the order this page names them.
ITEM_TYPES = (STDOUT, STDERR, MEDIA, HTML)

PNG = "image/png"
SVG = "image/svg+xml"
#: The media types a kernel sends, and whether their data is base64 (else plain text).
MEDIA_TYPES = {PNG: True, SVG: False}
#: The file name suffix a client gives each media type.
SUFFIXES = {PNG: ".png", SVG: ".svg"}


@attrs.frozen
class Output:
    """Text the code wrote to ``stream`` (``stdout`` or ``stderr``)."""

    stream: str
    text: str


@attrs.frozen
class Media:
    """A picture: ``mime`` is ``image/png`` (``data`` base64 text) or ``image/svg+xml`` (SVG text)."""

    mime: str
    data: str

    @property
    def content(self) -> bytes:
        """The picture's bytes (decoded from base64 for ``image/png``)."""
        if MEDIA_TYPES.get(self.mime, False):
            return base64.b64decode(self.data, validate=True)
        return self.data.encode("utf-8")

    @property
    def suffix(self) -> str:
        return SUFFIXES.get(self.mime, ".bin")


@attrs.frozen
class Html:
    """An HTML fragment (not a whole page)."""

    text: str


ConsoleItem = Union[Output, Media, Html]


def parse_item(item: object) -> ConsoleItem:
    """One console item; ``ValueError`` saying what is wrong with it."""
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"a console item is [type, data], not {item!r:.80}")
    kind, data = item
    if kind in (STDOUT, STDERR):
        if not isinstance(data, str):
            raise ValueError(f"{kind} data must be text, not {type(data).__name__}")
        return Output(kind, data)
    if kind == HTML:
        if not isinstance(data, str):
            raise ValueError(f"html data must be text, not {type(data).__name__}")
        return Html(data)
    if kind == MEDIA:
        if not (isinstance(data, (list, tuple)) and len(data) == 2 and all(isinstance(p, str) for p in data)):
            raise ValueError(f"media data is [mime, data], not {data!r:.80}")
        mime, payload = data
        if mime not in MEDIA_TYPES:
            raise ValueError(f"unknown media type {mime!r}")
        if MEDIA_TYPES[mime]:
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{mime} data is not base64: {e}") from None
        return Media(mime, payload)
    raise ValueError(f"unknown console item type {kind!r}")


def parse_console(console: object) -> list[ConsoleItem]:
    """Every item of ``console`` (the answer's list), in order; ``ValueError`` on any bad one."""
    if not isinstance(console, (list, tuple)):
        raise ValueError(f"the console is a list, not {type(console).__name__}")
    return [parse_item(item) for item in console]


def console_text(items: list[ConsoleItem], stream: str = STDOUT) -> str:
    """The text one stream wrote, joined (rich items left out)."""
    return "".join(item.text for item in items if isinstance(item, Output) and item.stream == stream)
