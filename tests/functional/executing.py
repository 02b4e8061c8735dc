"""Running code through a real agent, for the functional tests of Execute and files."""

import pytest_twisted

IMAGE = "bai-kernel/python:3.11"
#: The kernel image labelled as a shell runtime (batch mode without Python), built from IMAGE.
SHELL_IMAGE = "bai-test/shell-runtime:1"


@pytest_twisted.inlineCallbacks
def run_to_end(client, kernel_id, mode, code="", options=None):
    """Execute, then continue until the run ends; the joined console and the last answer."""
    answer = yield client.execute(kernel_id, mode, code, options=options)
    console = list(answer["console"])
    while answer["status"] in ("continued", "build-finished"):
        answer = yield client.execute(kernel_id, "continue", run_id=answer["run_id"], options=options)
        console += answer["console"]
    return console, answer


def text(console, stream=None):
    return "".join(data for kind, data in console if stream in (None, kind))
