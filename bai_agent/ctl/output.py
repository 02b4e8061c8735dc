"""
What ``bai-agent-ctl run`` and ``repl`` show of a run's console (PROTOCOL.md sections 2
and 10), in the order the kernel wrote it: ``stdout`` and ``stderr`` text as it is; each
picture (``media``) saved to a file of the output directory, its path printed where the
picture was; ``html`` printed as its text after a one-line note. An item that is not one
of those gets a note on stderr, and the items after it are shown all the same.

Pictures are numbered ``N.png``, ``N.svg`` from the highest number already in the
directory, plus one; a file is never overwritten (created with ``O_EXCL``, the next number
tried when it exists).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from bai_agent.protocol.console import Html, Media, Output, parse_item

#: Where pictures go unless ``--output-dir`` says otherwise (relative to the working directory).
DEFAULT_OUTPUT_DIR = "bai-output"
DIR_MODE = 0o755
FILE_MODE = 0o644
HTML_NOTE = "[html, shown as text]\n"

# A file this directory numbers: "12.png", "3.svg", "7.bin".
_NUMBERED = re.compile(r"([0-9]+)\.[^.]+")


class OutputDir:
    """
    The directory pictures are saved in, made (0755) when the first picture comes.

    ``save`` gives each picture the next number: the highest one in the directory (at any
    suffix), or the last this process gave, plus one.
    """

    def __init__(self, path: str = DEFAULT_OUTPUT_DIR):
        self.path = path
        self._last = 0

    def save(self, media: Media) -> str:
        """Write the picture to a new file; its path. ``OSError`` when it cannot be written."""
        content = media.content
        self._make()
        number = max(self._last, self._highest()) + 1
        while True:
            path = os.path.join(self.path, f"{number}{media.suffix}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                number += 1
                continue
            self._last = number
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(content)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # no half picture under a number
                raise
            return path

    def _make(self) -> None:
        if os.path.isdir(self.path):
            return
        try:
            os.makedirs(self.path, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(self.path):
                raise
            return  # made meanwhile by someone else: theirs, as it is
        os.chmod(self.path, DIR_MODE)  # 0755 whatever the umask

    def _highest(self) -> int:
        highest = 0
        with os.scandir(self.path) as entries:
            for entry in entries:
                match = _NUMBERED.fullmatch(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest


class ConsoleView:
    """
    Shows console items on a terminal's two writers, in order, pictures saved in
    ``output``. A note (a saved picture's path, ...) starts a line of its own:
    ``at_line_start`` says whether what was written last ended a line (set it back to True
    when the person has pressed Enter, after an ``input()`` prompt).
    """

    def __init__(
        self,
        write_stdout: Callable[[str], object],
        write_stderr: Callable[[str], object],
        output: OutputDir | None = None,
    ):
        self.write_stdout = write_stdout
        self.write_stderr = write_stderr
        self.output = output if output is not None else OutputDir()
        self.at_line_start = True

    def show(self, console: Iterable[Any] | None) -> None:
        """Show every item of one answer's console (the raw ``[type, data]`` list)."""
        if console is None:
            return
        if not isinstance(console, (list, tuple)):
            self._note(self.write_stderr, f"[console not shown: a list expected, not {type(console).__name__}]\n")
            return
        for entry in console:
            self.show_item(entry)

    def show_item(self, entry: object) -> None:
        try:
            item = parse_item(entry)
        except ValueError as e:
            self._note(self.write_stderr, f"[console item not shown: {e}]\n")
            return
        if isinstance(item, Output):
            self._text(self.write_stderr if item.stream == "stderr" else self.write_stdout, item.text)
        elif isinstance(item, Media):
            try:
                path = self.output.save(item)
            except (OSError, ValueError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                self._note(self.write_stderr, f"[{item.mime} not saved in {self.output.path}: {reason}]\n")
            else:
                self._note(self.write_stdout, f"[{item.mime} saved to {path}]\n")
        elif isinstance(item, Html):
            self._note(self.write_stdout, HTML_NOTE)
            text = item.text
            self._text(self.write_stdout, text if not text or text.endswith("\n") else text + "\n")

    def _note(self, write: Callable[[str], object], note: str) -> None:
        self._text(write, note if self.at_line_start else "\n" + note)

    def _text(self, write: Callable[[str], object], text: str) -> None:
        if text:
            write(text)
            self.at_line_start = text.endswith("\n")


def render_console(
    console: Iterable[Any] | None,
    write_stdout: Callable[[str], object],
    write_stderr: Callable[[str], object],
    output: OutputDir | None = None,
) -> None:
    """Show one console with a view of its own (see ``ConsoleView``)."""
    ConsoleView(write_stdout, write_stderr, output).show(console)
