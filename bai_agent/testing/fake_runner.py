"""
A stand-in for the runner link of a kernel, for tests of the kernel lifecycle on the fake
Docker backend (where no runner process exists).
"""

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from bai_agent.kernels.runner_link import RunnerUnavailable


class FakeRunnerLink:
    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.dead: Deferred[Any] = Deferred()
        self.sent = []
        self.handler = None
        self.closed_because = None
        self.hello = {"type": "hello", "protocol": 1}

    @property
    def alive(self):
        return self.closed_because is None

    def send(self, message):
        if not self.alive:
            raise RunnerUnavailable("the link to the runner is closed")
        self.sent.append(message)
        if message.get("type") == "list-services" and self.handler is not None:
            # A runner with no services answers at once, as the real one does.
            self.handler({"type": "services", "id": message.get("id"), "services": []})

    def close(self, reason="closed by the agent"):
        if self.closed_because is None:
            self.closed_because = reason
            self.dead.callback(reason)

    paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def request_completions(self, text, options=None, timeout=5.0):
        return succeed([])

    def interrupt(self, timeout=5.0):
        return succeed(False)


class FakeRunners:
    """
    ``connect`` has the signature of ``runner_link.connect_runner``. By default every
    runner answers at once; ``hold()`` makes the next connections wait until ``release()``,
    and ``fail_next(error)`` makes the next one fail.
    """

    def __init__(self):
        self.links = []
        self.held = []
        self._holding = False
        self._failures = []

    def connect(self, reactor, socket_path, clock, timeout=30.0, **options):
        if self._failures:
            return fail(self._failures.pop(0))
        link = FakeRunnerLink(socket_path)
        if self._holding:
            d: Deferred[Any] = Deferred()
            self.held.append((d, link))
            return d
        self.links.append(link)
        return succeed(link)

    def hold(self):
        self._holding = True

    def release(self):
        self._holding = False
        held, self.held = self.held, []
        for d, link in held:
            if not d.called:  # not cancelled meanwhile
                self.links.append(link)
                d.callback(link)

    def fail_next(self, error=None):
        self._failures.append(error or RunnerUnavailable("the runner did not answer"))
