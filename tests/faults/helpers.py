"""
What the fault suite's tests share: the ledger of figures, a manager-side event recorder,
Docker and etcd look-ups (blocking, standard library), and ``Scenario``, which starts the
agents of one test and leaves nothing behind.

Blocking work (stopping a process, Docker calls, HTTP polls) runs in the reactor's thread
pool through ``blocking()`` while a test holds AMP connections: a reactor blocked for
three heartbeats would make the agent drop the manager, and the test would then test
that instead.
"""

import base64
import json
import shutil
import signal
import urllib.request
import uuid
from dataclasses import dataclass, field, fields
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred, inlineCallbacks

from bai_agent.docker.engine import image_path
from bai_agent.kernels.workspace import POOL_DIR
from bai_agent.node.scratch import VOLUMES_DIR, ScratchVolumes
from bai_agent.protocol.client import AgentClient
from bai_agent.testing.docker_host import docker_request
from bai_agent.testing.waiting import blocking, wait_until
from tests.functional.agent_process import AgentProcess

AGENT_ID_LABEL = "ai.backend.agent-id"
KERNEL_ID_LABEL = "ai.backend.kernel-id"

#: PROTOCOL.md section 3, plus the agent's own reason for ``--destroy-kernels-on-stop``.
PROTOCOL_REASONS = frozenset(
    {
        "user-requested",
        "idle-timeout",
        "exec-timeout",
        "oom-killed",
        "self-terminated",
        "agent-reset",
        "restarting",
        "orphan-cleanup",
        "creation-failed",
    }
)
STOP_REASONS = PROTOCOL_REASONS | {"agent-stopping"}

START_TIMEOUT = 30.0
EVENT_TIMEOUT = 30.0


# -- figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    kernels_expected: int = 0  # kernels that should survive the fault
    kernels_survived: int = 0  # ... and were listed running and executed code afterwards
    events_expected: int = 0
    events_received: int = 0  # expected events that arrived
    seq_gaps: int = 0  # seqs missing between the first and the last one a manager saw
    seq_conflicts: int = 0  # one seq delivered with two different contents
    containers_leaked: int = 0
    scratch_dirs_leaked: int = 0

    @property
    def events_lost(self):
        return self.events_expected - self.events_received + self.seq_gaps + self.seq_conflicts

    def add(self, other):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def problems(self):
        """Why these figures are not the promise (empty when they are)."""
        problems = []
        if self.kernels_survived != self.kernels_expected:
            problems.append(f"kernels survived {self.kernels_survived}/{self.kernels_expected}")
        if self.events_lost:
            problems.append(
                f"events lost {self.events_lost} (expected {self.events_expected}, received "
                f"{self.events_received}, seq gaps {self.seq_gaps}, seq conflicts {self.seq_conflicts})"
            )
        if self.containers_leaked:
            problems.append(f"containers leaked {self.containers_leaked}")
        if self.scratch_dirs_leaked:
            problems.append(f"scratch dirs leaked {self.scratch_dirs_leaked}")
        return problems


@dataclass
class Ledger:
    """The session's figures, test by test."""

    tests: dict = field(default_factory=dict)  # nodeid -> Figures

    def figures(self, nodeid) -> Figures:
        return self.tests.setdefault(nodeid, Figures())

    def total(self) -> Figures:
        total = Figures()
        for figures in self.tests.values():
            total.add(figures)
        return total

    def summary(self) -> str:
        t = self.total()
        return (
            f"fault suite: kernels survived {t.kernels_survived}/{t.kernels_expected}, "
            f"events lost {t.events_lost} (of {t.events_expected} expected), "
            f"containers leaked {t.containers_leaked}, scratch dirs leaked {t.scratch_dirs_leaked}"
        )


# -- Docker (any daemon, by its host) and etcd (by URL) -----------------------------------------


class DockerAPI:
    """Blocking Engine API calls the tests need, against the daemon at ``host``."""

    def __init__(self, host):
        self.host = host

    def _call(self, method, path, body=None, ok=(200, 201, 204, 304)):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        status, answer = docker_request(self.host, method, path, body=data, headers=headers, timeout=60.0)
        if status not in ok:
            raise AssertionError(f"Docker {method} {path}: HTTP {status} {answer[:300]!r}")
        return json.loads(answer) if answer.strip() else None

    def containers(self, labels=None, all=True):
        label_filters = [f"{key}={value}" if value is not None else key for key, value in (labels or {}).items()]
        query = urlencode({"all": "1" if all else "0", "filters": json.dumps({"label": label_filters})})
        return self._call("GET", "/containers/json?" + query)

    def agent_containers(self, agent_id):
        """Ids of every container labelled with ``agent_id``, running or not."""
        return [container["Id"] for container in self.containers({AGENT_ID_LABEL: agent_id})]

    def inspect(self, container):
        status, answer = docker_request(
            self.host, "GET", "/containers/" + quote(container, safe="") + "/json", timeout=30.0
        )
        return json.loads(answer) if status == 200 else None

    def running(self, container):
        document = self.inspect(container)
        return bool(document and document["State"].get("Running"))

    def kill(self, container):
        self._call("POST", "/containers/" + quote(container, safe="") + "/kill?signal=KILL")

    def remove(self, container):
        self._call("DELETE", "/containers/" + quote(container, safe="") + "?force=1&v=1", ok=(200, 204, 404))

    def create(self, image, labels, name=None, command=("sleep", "300")):
        """A container that only sleeps (no runner), started; its id."""
        query = "?" + urlencode({"name": name}) if name else ""
        body = {
            "Image": image,
            "Entrypoint": [],
            "Cmd": list(command),
            "Labels": dict(labels),
            "HostConfig": {"NetworkMode": "none", "Memory": 64 << 20},
        }
        container = self._call("POST", "/containers/create" + query, body)["Id"]
        self._call("POST", f"/containers/{container}/start")
        return container

    def has_image(self, name):
        status, _ = docker_request(self.host, "GET", image_path(name, "/json"), timeout=10.0)
        return status == 200


def etcd_get(etcd_url, key):
    """The raw value (str) of ``key`` in etcd through the v3 gateway, or None."""
    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/range",
        data=json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            document = json.load(response)
    except (OSError, ValueError):
        return None
    kvs = document.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def etcd_put(etcd_url, key, value):
    """Put ``key`` = ``value`` (str) in etcd through the v3 gateway."""
    request = urllib.request.Request(
        f"{etcd_url}/v3/kv/put",
        data=json.dumps(
            {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def etcd_record(etcd_url, namespace, agent_id):
    """The agent record (a dict) of ``agent_id`` in etcd, or None."""
    raw = etcd_get(etcd_url, f"/bai/{namespace}/agents/{agent_id}")
    return json.loads(raw) if raw else None


# -- events, as a manager sees them -------------------------------------------------------------


class EventRecorder:
    """
    A manager's view of one agent's events: it subscribes, records every ``Event`` by seq,
    resubscribes after ``since`` = the last seq it acknowledged, and tells what was lost:
    the expected events that never came, the seqs missing between the first and the last
    one seen, and seqs delivered twice with different contents.

    ``hold()`` makes it stop acknowledging (events are noted as ``held``, the answer never
    goes out), as a manager that was busy when its connection broke; ``release()``
    forgets the unanswered ones.
    """

    def __init__(self, scenario, agent, name="manager"):
        self.scenario = scenario
        self.agent = agent
        self.name = name
        self.by_seq = {}  # seq -> event, acknowledged ones
        self.held = {}  # seq -> event, received but never acknowledged
        self.conflicts = []
        self.first_since = None
        self.announced = 0  # the largest last_seq a Subscribe answered
        self.expectations = []  # (description, matcher)
        self.client = None
        self.holding = False
        self.accounted = False

    # -- receiving

    def _on_event(self, event):
        seq = event["seq"]
        key = (event["type"], event["kernel_id"], json.dumps(event["data"], sort_keys=True))
        for known in (self.by_seq.get(seq), self.held.get(seq)):
            if known is not None:
                old = (known["type"], known["kernel_id"], json.dumps(known["data"], sort_keys=True))
                if old != key:
                    self.conflicts.append((seq, known, event))
        if self.holding:
            self.held[seq] = event
            return Deferred()  # never answered: not acknowledged
        self.by_seq.setdefault(seq, event)
        return None

    def hold(self):
        self.holding = True

    def release(self):
        self.holding = False

    def last_acknowledged(self):
        """The highest seq up to which every event was acknowledged (the ``since`` to resume from)."""
        seq = self.first_since or 0
        while seq + 1 in self.by_seq:
            seq += 1
        return seq

    # -- connecting

    @property
    def connected(self):
        return self.client is not None and not self.client.disconnected.called

    @inlineCallbacks
    def connect(self):
        """(Re)connect and subscribe after the last acknowledged seq."""
        self.close()
        self.client = yield self.scenario.connect(self.agent, on_event=self._on_event)
        since = self.last_acknowledged()
        if self.first_since is None:
            self.first_since = since
        self.announced = max(self.announced, (yield self.client.subscribe(since)))
        return self.client

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def abort(self):
        """Drop the connection abruptly (no FIN handshake, nothing flushed)."""
        if self.client is not None and self.client.protocol.transport is not None:
            self.client.protocol.transport.abortConnection()
        self.client = None

    @inlineCallbacks
    def settle(self, timeout=EVENT_TIMEOUT):
        """Resubscribe (reconnecting if need be) and wait until every journaled event is acknowledged."""
        self.release()
        if self.connected:
            self.announced = max(self.announced, (yield self.client.subscribe(self.last_acknowledged())))
        else:
            yield self.connect()
        target = self.announced
        yield wait_until(
            self.scenario.reactor,
            lambda: self.last_acknowledged() >= target,
            timeout,
            f"{self.name} to acknowledge every event up to seq {target} (has {self.last_acknowledged()})",
        )

    # -- looking

    def events(self, type=None, kernel_id=None):
        """Acknowledged events, once per seq, in seq order."""
        return [
            event
            for seq, event in sorted(self.by_seq.items())
            if (type is None or event["type"] == type) and (kernel_id is None or event["kernel_id"] == kernel_id)
        ]

    def terminations(self, kernel_id):
        return self.events("kernel-terminated", kernel_id)

    @inlineCallbacks
    def wait_for(self, type, kernel_id=None, timeout=EVENT_TIMEOUT):
        """The first acknowledged event of ``type`` (for ``kernel_id``), once it arrives."""
        found = yield wait_until(
            self.scenario.reactor,
            lambda: self.events(type, kernel_id),
            timeout,
            f"a {type} event{' for ' + kernel_id if kernel_id else ''} at {self.name}",
        )
        return found[0]

    def expect(self, type, kernel_id=None, reasons=None, exit_code=None, after=0):
        """
        Count an event that must arrive: of ``type`` (for ``kernel_id``), with a reason in
        ``reasons`` and ``exit_code`` when given, and a seq above ``after``.
        """

        def matches(event):
            if event["type"] != type or event["seq"] <= after:
                return False
            if kernel_id is not None and event["kernel_id"] != kernel_id:
                return False
            if reasons is not None and event["data"].get("reason") not in reasons:
                return False
            if exit_code is not None and event["data"].get("exit_code") != exit_code:
                return False
            return True

        description = f"{type} {kernel_id or ''} reason in {sorted(reasons) if reasons else 'any'}"
        self.expectations.append((description, matches))

    def missing(self):
        return [
            description for description, matches in self.expectations if not any(map(matches, self.by_seq.values()))
        ]

    def gaps(self):
        if not self.by_seq:
            return []
        first = (self.first_since or 0) + 1
        return [seq for seq in range(first, max(self.by_seq) + 1) if seq not in self.by_seq]

    def account(self, figures):
        """Add this recorder's figures once."""
        if self.accounted:
            return
        self.accounted = True
        figures.events_expected += len(self.expectations)
        figures.events_received += len(self.expectations) - len(self.missing())
        figures.seq_gaps += len(self.gaps())
        figures.seq_conflicts += len(self.conflicts)

    def report(self):
        return (
            f"{self.name}: missing {self.missing()}, seq gaps {self.gaps()}, conflicts {self.conflicts}, "
            f"seen {[(e['seq'], e['type'], e['kernel_id'], e['data'].get('reason')) for e in self.events()]}"
        )


# -- one test's agents ---------------------------------------------------------------------------


class Scenario:
    """
    The agents, connections, recorders and stray containers of one test. Ids and the
    namespace are unique per test. ``close()`` (the fixture's teardown) ends every agent
    process by pid, counts what is left as leaks when the test did not clean up itself,
    then removes containers by label and deletes directories.
    """

    def __init__(self, reactor, tmp_path, figures, etcd, docker_host, image):
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.figures = figures
        self.etcd = etcd
        self.docker_host = docker_host
        self.image = image
        self.token = uuid.uuid4().hex[:8]
        self.namespace = f"faults-{self.token}"
        self.agents = []  # (AgentProcess, DockerAPI)
        self.cleaned = set()  # agent ids whose leaks were counted
        self.clients = []
        self.recorders = []
        self.strays = []  # (DockerAPI, container id) the test made itself

    # -- agents

    def new_agent(self, name, extra=(), docker_host=None, etcd=None, start=True):
        """An agent process (not yet started unless ``start``) with its own ids and directories."""
        docker_host = docker_host or self.docker_host
        etcd = etcd or self.etcd
        agent_id = f"{name}-{self.token}"
        agent = AgentProcess(
            self.tmp_path,
            etcd.addr,
            namespace=self.namespace,
            agent_id=agent_id,
            extra=["--kernel-network", "none", "--docker-host", docker_host, *extra],
        )
        agent.docker = DockerAPI(docker_host)
        agent.etcd_url = etcd.url
        self.agents.append(agent)
        if start:
            self.start(agent)
        return agent

    def start(self, agent):
        """Start ``agent`` and wait for /healthz 200 (blocking: use ``start_async`` with connections open)."""
        agent.start()
        agent.wait_for(lambda: agent.http("/healthz")[0] == 200, START_TIMEOUT, f"/healthz 200 of {agent.agent_id}")
        return agent

    def start_async(self, agent):
        return blocking(self.reactor, self.start, agent)

    def stop_async(self, agent, sig=signal.SIGTERM, timeout=60):
        """Signal ``agent`` and wait (in a thread) for its exit status."""
        return blocking(self.reactor, agent.stop, sig, timeout)

    def wait_exit(self, agent, timeout=60):
        """Wait (in a thread) for ``agent`` to exit by itself; its exit status."""

        def wait():
            try:
                return agent.process.wait(timeout)
            finally:
                agent.stop()  # closes its log (and ends it, had it hung)

        return blocking(self.reactor, wait)

    @staticmethod
    def alive(agent):
        return agent.process is not None and agent.process.poll() is None

    def secret(self, agent):
        return agent.secret_path.read_text().strip()

    @inlineCallbacks
    def connect(self, agent, on_event=None):
        client = yield AgentClient.connect(
            self.reactor, f"127.0.0.1:{agent.amp_port}", self.secret(agent), on_event=on_event
        )
        self.clients.append(client)
        return client

    def recorder(self, agent, name="manager"):
        recorder = EventRecorder(self, agent, name)
        self.recorders.append(recorder)
        return recorder

    # -- checks

    def stray_dirs(self, agent, live_kernel_ids=()):
        """
        Entries under the agent's scratch root that no live kernel owns: homes, the
        filesystem images of homes (``.volumes/``, with ``--scratch-type hostfile``), and the
        warm pool's homes (``.pool/``).
        """
        if not agent.scratch_root.exists():
            return []
        live = set(live_kernel_ids)
        stray = [
            entry.name
            for entry in agent.scratch_root.iterdir()
            if entry.name not in live and entry.name not in (VOLUMES_DIR, POOL_DIR)
        ]
        pool = agent.scratch_root / POOL_DIR  # the warm pool's homes: none once the pool is gone
        if pool.exists():
            stray += [f"{POOL_DIR}/{entry.name}" for entry in pool.iterdir()]
        volumes = agent.scratch_root / VOLUMES_DIR
        if volumes.exists():
            volumes_of = ScratchVolumes(str(agent.scratch_root), "hostfile")
            images = {volumes_of.image_path(str(agent.scratch_root / kernel_id)) for kernel_id in live}
            stray += [f"{VOLUMES_DIR}/{entry.name}" for entry in volumes.iterdir() if str(entry) not in images]
        return sorted(stray)

    @inlineCallbacks
    def grants_used(self, client):
        """``resources`` ``used`` of GetAgentInfo, as {slot: used}."""
        info = yield client.get_agent_info()
        return {slot: value["used"] for slot, value in info["resources"].items()}

    @inlineCallbacks
    def check_survivor(self, client, kernel_id, variable="x", value=41):
        """Count one kernel that should have survived: listed running and its interpreter kept ``variable``."""
        self.figures.kernels_expected += 1
        listed = {kernel["kernel_id"]: kernel for kernel in (yield client.list_kernels())}
        if kernel_id not in listed or listed[kernel_id]["status"] != "running":
            return False
        answer = yield client.execute(kernel_id, "query", f"print({variable} + 1)")
        if answer["status"] != "finished" or answer["console"] != [["stdout", f"{value + 1}\n"]]:
            return False
        self.figures.kernels_survived += 1
        return True

    # -- the end

    @inlineCallbacks
    def clean_up(self, agent, recorders=()):
        """
        What an operator would do: (re)start the agent if need be, Reset it over AMP, let
        the recorders collect everything, stop it with SIGTERM. Then count what is left as
        leaks and return ``(containers, scratch dirs)`` for the test to assert empty.
        """
        if not self.alive(agent):
            yield self.start_async(agent)
        client = yield self.connect(agent)
        kernels = [kernel["kernel_id"] for kernel in (yield client.list_kernels())]
        for recorder in recorders:
            for kernel_id in kernels:
                recorder.expect("kernel-terminated", kernel_id, {"agent-reset"}, after=recorder.last_acknowledged())
        yield client.reset()
        client.close()
        for recorder in recorders:
            yield recorder.settle()
            recorder.close()
            recorder.account(self.figures)
        code = yield self.stop_async(agent)
        assert code == 0, f"{agent.agent_id} exited with {code} on SIGTERM:\n{agent.log_text()[-3000:]}"
        return (yield blocking(self.reactor, self.count_leaks, agent))

    def count_leaks(self, agent):
        """Containers labelled with the agent and its scratch dirs, counted as leaks once."""
        containers = agent.docker.agent_containers(agent.agent_id)
        dirs = self.stray_dirs(agent)
        if agent.agent_id not in self.cleaned:
            self.cleaned.add(agent.agent_id)
            self.figures.containers_leaked += len(containers)
            self.figures.scratch_dirs_leaked += len(dirs)
        return containers, dirs

    def close(self):
        """Teardown (blocking): processes by pid, containers by label, directories."""
        for client in self.clients:
            client.close()
        for recorder in self.recorders:
            recorder.close()
            recorder.account(self.figures)
        for agent in self.agents:
            if self.alive(agent):
                agent.stop(signal.SIGTERM, timeout=20)
            if agent.agent_id not in self.cleaned:
                self._last_resort_clean_up(agent)
            try:
                self.count_leaks(agent)
                for container in agent.docker.agent_containers(agent.agent_id):
                    agent.docker.remove(container)
            except (OSError, AssertionError):
                pass  # that daemon is down: the private daemon's own teardown removes everything
            agent.unmount_homes()  # before the rmtree, which would empty a mounted home in place
            shutil.rmtree(agent.scratch_root, ignore_errors=True)
            agent.remove_state()
        for docker, container in self.strays:
            try:
                docker.remove(container)
            except (OSError, AssertionError):
                pass

    def _last_resort_clean_up(self, agent):
        """
        The test ended before its own clean-up: let the agent remove its kernels itself
        (a start, then a stop with ``--destroy-kernels-on-stop``), so that what is counted
        as leaked is what the agent could not remove, not what the test left running.
        """
        if "--destroy-kernels-on-stop" not in agent.argv:
            agent.argv.append("--destroy-kernels-on-stop")
        try:
            agent.start()
            agent.wait_for(lambda: _kernels_taken_over(agent), START_TIMEOUT, "the agent to take over its kernels")
        except (AssertionError, OSError):
            pass
        finally:
            agent.stop(signal.SIGTERM, timeout=90)


def _kernels_taken_over(agent):
    """Docker answers and the agent took over the kernels of its last run (etcd may be away)."""
    status, body = agent.http("/status.json")
    if status != 200:
        return False
    snapshot = json.loads(body)
    return snapshot["docker"]["healthy"] and not any(p.startswith("kernels:") for p in snapshot["problems"])


def kernel_ids(kernels):
    return sorted(kernel["kernel_id"] for kernel in kernels)


def by_id(kernels):
    return {kernel["kernel_id"]: kernel for kernel in kernels}
