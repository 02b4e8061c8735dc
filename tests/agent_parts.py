"""
The agent's reporting side (record, health, AMP context, status sources) built from the
real classes over stand-ins for the services: ``AgentParts``, used by the tests of the AMP
server, the status page, the metrics and the graceful stop. Each stand-in is an attribute
a test may change in place (``parts.etcd.registered = False``); give a different one to
the constructor.
"""

import attrs

import bai_agent
from bai_agent.config import AgentConfig
from bai_agent.health import AgentHealth
from bai_agent.kernels.allocator import Allocator
from bai_agent.node.capacity import Capacity
from bai_agent.report import AgentReport, agent_info
from bai_agent.rpc.server import AgentAMPFactory, AmpContext
from bai_agent.status.history import StatsHistory
from bai_agent.status.metrics import AgentMetrics
from bai_agent.status.page import StatusPage
from bai_agent.status.sources import StatusSources
from bai_agent.stopping import StopFlag

SECRET = "5e" * 32


@attrs.define
class StubImage:
    name: str

    def to_json(self):
        return {"name": self.name, "id": "sha256:1", "runtime_type": "python", "labels": {}}


@attrs.define
class StubDocker:
    healthy: bool = True
    last_error: str = None
    images: list = attrs.Factory(lambda: [StubImage("bai-kernel/python:3.11")])
    api_version: str = "1.41"
    daemon_version: str = "20.10"


@attrs.define
class StubEtcd:
    secret: str = SECRET
    registered: bool = True
    last_error: str = None
    last_heartbeat_at: float = None
    heartbeat_interval: float = 3.0
    heartbeat_delay: float = 0.0
    heartbeat_delay_max: float = 0.0


class StubJournal:
    """An event journal with no events."""

    last_seq = 0
    file_bytes = 0

    def __len__(self):
        return 0

    def since(self, seq):
        return []

    def add_listener(self, listener):
        pass


class FakeKernels:
    """The registry's reading side, over a real allocator: ``records``, ``count``, ``allocator``."""

    def __init__(self, capacity, gpus=(), cpu_cores=None):
        self.allocator = Allocator(capacity, list(gpus), cpu_cores=cpu_cores)
        self.recovered = True
        self.taken_over = True
        self.kernels = {}
        self.pulls = []  # pulls_in_progress
        self.pool = {
            "images": {},
            "problem": None,
            "claims": 0,
            "misses": 0,
            "filled": 0,
            "failures": 0,
            "last_refill_seconds": None,
        }
        self.relayed = {
            "connections": 0,
            "refused": 0,
            "failed": 0,
            "idle_closed": 0,
            "bytes_to_service": 0,
            "bytes_to_client": 0,
            "running": 0,
        }

    def records(self, reveal=True):
        # The records are the test's own: whether they hide tokens is up to it.
        return sorted(self.kernels.values(), key=lambda record: record["created_at"])

    def list_records(self):
        return self.records()

    def count(self):
        return len(self.kernels)

    def relay_totals(self):
        return dict(self.relayed)

    def pool_state(self):
        return self.pool

    def pulls_in_progress(self):
        return list(self.pulls)


class AgentParts:
    def __init__(
        self,
        clock,
        tmp_path,
        kernels=None,
        stats=None,
        journal=None,
        etcd=None,
        docker=None,
        capacity=None,
        max_waiting=None,
        history=None,
        **config,
    ):
        config.setdefault("agent_id", "agent-1")
        self.config = AgentConfig(scratch_root=str(tmp_path), state_dir=str(tmp_path), **config)
        self.clock = clock
        self.docker = docker if docker is not None else StubDocker()
        self.etcd = etcd if etcd is not None else StubEtcd()
        self.kernels = kernels if kernels is not None else FakeKernels(capacity or Capacity(4.0, 8 << 30, 0))
        self.stats = stats
        self.journal = journal if journal is not None else StubJournal()
        self.metrics = AgentMetrics()
        self.stopping = StopFlag()
        self.report = AgentReport(self.config, clock, self.docker, self.kernels, stats, self.stopping)
        self.health = AgentHealth(clock, self.docker, self.etcd, self.kernels, self.stopping)
        self.amp = AmpContext(
            clock=clock,
            agent_id=self.config.agent_id,
            version=bai_agent.__version__,
            kernels=self.kernels,
            journal=self.journal,
            images=self.docker,
            info=lambda: self.info(),
            secret=lambda: self.etcd.secret,
            observe_command=self.metrics.observe_command,
            heartbeat_interval=lambda: self.etcd.heartbeat_interval,
            stopping=self.stopping,
            authentication_deadline=self.config.authentication_deadline,
        )
        self.sources = StatusSources(
            config=self.config,
            clock=clock,
            report=self.report,
            health=self.health,
            info=lambda: self.info(),
            kernels=self.kernels,
            journal=self.journal,
            stats=stats,
            etcd=self.etcd,
            docker=self.docker,
            connections=self.amp.connections,
            history=history if history is not None else StatsHistory(5.0),
        )
        self.metrics.report(self.sources)
        self.max_waiting = max_waiting

    def info(self):
        return agent_info(self.report, self.etcd)

    def amp_factory(self, **kwargs):
        return AgentAMPFactory(self.amp, **kwargs)

    def status_page(self):
        return StatusPage(self.sources, self.metrics)

    # What tests read of the reporting side.
    def note(self, message):
        self.health.note(message)

    @property
    def recent_events(self):
        return self.health.recent_events

    def problems(self):
        return self.health.problems()

    def record(self):
        return self.report.record()
