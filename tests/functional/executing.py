"""Running code through a real agent, for the functional tests of Execute and files."""

import time

import pytest_twisted
from twisted.internet.task import deferLater

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


def sleep(reactor, seconds):
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def wait_until(reactor, predicate, timeout, what):
    """Poll ``predicate`` every 0.1 s until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        yield sleep(reactor, 0.1)
    raise AssertionError(f"timed out waiting for {what}")
