"""
What every benchmark needs: its own etcd and a real agent (kernels without a network) in
a scratch directory, a connected client, and the cleanup of all of it.
"""

import pathlib
import shutil
import tempfile

from twisted.internet.defer import inlineCallbacks

from bai_agent.protocol.client import AgentClient
from bai_agent.testing.etcd_server import EtcdServer
from tests.functional.agent_process import AgentProcess


class BenchAgent:
    def __init__(self, extra=(), agent_id="bench-agent"):
        """
        ``extra``: more agent command-line arguments; later ones win (``--heartbeat-interval 3``).
        ``agent_id``: its containers carry it as a label, so a bench that may run beside
        another gives one of its own and removes only its own leftovers.
        """
        self.extra = list(extra)
        self.agent_id = agent_id
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="bai-bench-"))
        self.etcd = EtcdServer(self.work / "etcd")
        self.agent = None

    def start(self):
        """Start etcd and the agent, and wait until the agent is healthy (blocking)."""
        self.etcd.start()  # picks its ports, which the agent needs
        self.agent = AgentProcess(
            self.work,
            self.etcd.addr,
            namespace="bench",
            agent_id=self.agent_id,
            extra=["--kernel-network", "none", *self.extra],
        )
        self.agent.start()
        self.agent.wait_for(lambda: self.agent.http("/healthz")[0] == 200, 30, "the agent")

    @inlineCallbacks
    def connect(self, reactor):
        secret = self.agent.secret_path.read_text().strip()
        client = yield AgentClient.connect(reactor, f"127.0.0.1:{self.agent.amp_port}", secret, timeout=30)
        return client

    def stop(self):
        if self.agent is not None:
            self.agent.stop()
            self.agent.remove_state()
        self.etcd.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def percentile(values, fraction):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
