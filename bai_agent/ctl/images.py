"""
``bai-agent-ctl pull`` and ``rmi``: images from registries (docs/protocol.md section 8), with
the pull's progress drawn on the terminal as ``docker pull`` does, from the agent's
``image-pull-progress`` events.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Generator
from typing import IO, Any

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.ctl.errors import CtlError

BAR_WIDTH = 30
PASSWORD_ENV = "BAI_REGISTRY_PASSWORD"


def add_parsers(sub: Any) -> None:
    pull = sub.add_parser(
        "pull",
        help="pull an image from a registry onto an agent's machine, showing its progress",
        description="Pull IMAGE (registry/repository:tag or @sha256:...) through the agent. "
        f"Credentials: --username, and the password from --password-stdin or ${PASSWORD_ENV}; "
        "without them the agent uses the registry's credentials in etcd, if any.",
    )
    pull.add_argument("agent", help="agent id, or HOST:PORT")
    pull.add_argument("image", help="the image reference")
    pull.add_argument("--username", help="registry user name")
    pull.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    rmi = sub.add_parser("rmi", help="remove a kernel image from an agent's machine (refused while a kernel runs it)")
    rmi.add_argument("agent", help="agent id, or HOST:PORT")
    rmi.add_argument("image", help="the image, as the agent lists it")


def registry_auth(args: argparse.Namespace, stdin: IO[str]) -> dict[str, str] | None:
    if args.username is None:
        if args.password_stdin:
            raise CtlError("--password-stdin needs --username")
        return None
    password = stdin.readline().rstrip("\r\n") if args.password_stdin else os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise CtlError(f"--username needs a password: --password-stdin, or ${PASSWORD_ENV}")
    return {"username": args.username, "password": password}


def progress_line(image: str, done: int, total: int) -> str:
    """``IMAGE [=====>     ]  12.3MB/45.6MB``, as ``docker pull`` draws it."""
    if total > 0:
        filled = min(BAR_WIDTH, done * BAR_WIDTH // total)
        bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + " " * (BAR_WIDTH - filled - 1)
        return f"{image} [{bar[:BAR_WIDTH]}] {_size(done)}/{_size(total)}"
    return f"{image} {_size(done)}"


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"


@inlineCallbacks
def pull(client: Any, args: argparse.Namespace, out: IO[str], stdin: IO[str]) -> Generator[Deferred[Any], Any, None]:
    auth = registry_auth(args, stdin)
    terminal = hasattr(out, "isatty") and out.isatty()
    drawn = [False]
    after = [None]

    def on_event(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if after[0] is None or event.get("seq", 0) <= after[0] or data.get("image") is None:
            return  # what happened before this pull, replayed
        if event.get("type") == "image-pull-progress":
            line = progress_line(
                str(data["image"]), int(data.get("bytes_done") or 0), int(data.get("bytes_total") or 0)
            )
            out.write(("\r" + line + "\x1b[K") if terminal else line + "\n")
            out.flush()
            drawn[0] = True

    client.set_event_handler(on_event)
    after[0] = yield client.subscribe(0)
    try:
        entry = yield client.pull_image(args.image, auth)
    finally:
        if drawn[0] and terminal:
            out.write("\n")
    if args.json:
        out.write(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    else:
        out.write(f"pulled {entry['name']} ({entry['id'][:19]})\n")


@inlineCallbacks
def remove(client: Any, args: argparse.Namespace, out: IO[str]) -> Generator[Deferred[Any], Any, None]:
    yield client.remove_image(args.image)
    out.write(f"removed {args.image}\n")
