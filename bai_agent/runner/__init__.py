"""
The in-container runner: the main process of every kernel container.

This directory is bind-mounted read-only, alone, at ``/opt/bai/runner`` in each kernel
container and started there by the image's own Python (3.8+), so everything in it uses
the standard library only and imports its siblings as top-level modules (``main.py``, the
entry point, puts its own directory on ``sys.path`` and runs ``server.py``). Kernel
images may carry a *minimal* Python (Debian's ``python3-minimal`` has no ``json``,
``rlcompleter``, ``getpass``, ``shutil``), so the runner brings its own fallbacks for
those (``jsoncodec.py``, the completer in ``completion.py`` and the ``getpass`` shim in
``query.py``).

The agent imports this package only for :data:`RUNNER_DIR` and :func:`runner_command`,
and ``framing`` (shared frame format); see ``server.py`` for the wire protocol.
"""

from __future__ import annotations

import os

#: The host directory to bind-mount read-only into kernel containers.
RUNNER_DIR = os.path.dirname(os.path.abspath(__file__))

#: Where the runner directory is mounted in the container.
MOUNT_POINT = "/opt/bai/runner"

#: Where the per-kernel state directory (with the socket) is mounted in the container.
STATE_MOUNT_POINT = "/run/bai"

#: The socket's file name inside the per-kernel state directory.
SOCKET_NAME = "runner.sock"

#: The file, beside the socket, that holds the kernel's environment for user processes
#: (a JSON object the agent writes; the runner itself never runs with it).
ENVIRON_NAME = "environ.json"


def runner_command(
    python: str = "/usr/bin/python3",
    uid: int = 1000,
    gid: int = 1000,
    home: str = "/home/work",
    runtime_type: str = "python",
    runtime_path: str = "/usr/bin/python3",
    mount_point: str = MOUNT_POINT,
    socket_path: str = STATE_MOUNT_POINT + "/" + SOCKET_NAME,
    environ_file: str = STATE_MOUNT_POINT + "/" + ENVIRON_NAME,
) -> list[str]:
    """The container command (argv list) that starts the runner."""
    return [
        python,
        "-I",
        "-u",
        mount_point + "/main.py",
        "--socket",
        socket_path,
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--home",
        home,
        "--runtime-type",
        runtime_type,
        "--runtime-path",
        runtime_path,
        "--environ-file",
        environ_file,
    ]
