"""
The runner's command line (``main.py --socket PATH --uid N ...``, see ``server.py``):
the options, their defaults and the usage line.

A small parser instead of argparse, whose import is a quarter of the runner's start-up
time. Standard library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

#: Default cap of the outbox, in bytes.
OUTBOX_LIMIT = 4 * 1024 * 1024

#: option -> (attribute, converter, default); ``None`` default means required.
OPTIONS = {
    "--socket": ("socket", str, None),
    "--uid": ("uid", int, None),
    "--gid": ("gid", int, None),
    "--home": ("home", str, None),
    "--runtime-type": ("runtime_type", str, "python"),
    "--runtime-path": ("runtime_path", str, "/usr/bin/python3"),
    "--outbox-limit": ("outbox_limit", int, OUTBOX_LIMIT),
    "--environ-file": ("environ_file", str, ""),
}
USAGE = (
    "usage: main.py --socket PATH --uid N --gid N --home DIR [--runtime-type python|shell] "
    "[--runtime-path PATH] [--outbox-limit BYTES] [--environ-file PATH]"
)


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class Options:
    """The parsed options, as attributes named in ``OPTIONS``."""

    socket: str
    uid: int
    gid: int
    home: str
    runtime_type: str
    runtime_path: str
    outbox_limit: int
    environ_file: str

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def parse_args(argv: list[str]) -> Options:
    """``argv`` (without the program name) -> ``Options``; ``UsageError`` when it is wrong."""
    values = {attribute: default for attribute, _, default in OPTIONS.values()}
    argv = list(argv)
    while argv:
        option = argv.pop(0)
        value = None
        if "=" in option:
            option, value = option.split("=", 1)
        if option not in OPTIONS:
            raise UsageError(f"unknown option {option}")
        if value is None:
            if not argv:
                raise UsageError(f"{option} needs a value")
            value = argv.pop(0)
        attribute, convert, _ = OPTIONS[option]
        try:
            values[attribute] = convert(value)
        except ValueError:
            raise UsageError(f"{option}: invalid value {value!r}") from None
    missing = [option for option, (attribute, _, _) in OPTIONS.items() if values[attribute] is None]
    if missing:
        raise UsageError("missing " + ", ".join(missing))
    if values["runtime_type"] not in ("python", "shell"):
        raise UsageError("--runtime-type must be python or shell")
    return Options(**values)
