"""
Fuzzing the AMP surface of a whole agent (composition root, fake Docker, MemoryEtcd, fake
runners, MemoryReactorClock) with raw boxes from ``tests.amp_strategies``: every call gets
a valid answer or a declared error, never a dropped connection, and the agent keeps
serving and leaks nothing.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test import iosim

from bai_agent.config import AgentConfig
from bai_agent.kernels import kernel as states
from bai_agent.protocol import commands
from bai_agent.protocol.auth import compute_mac
from bai_agent.protocol.labels import AGENT_ID_LABEL
from bai_agent.rpc.limits import UNAUTHENTICATED
from bai_agent.rpc.server import AgentAMPFactory
from bai_agent.service import build_agent_service
from bai_agent.tap import prepare_directories
from bai_agent.testing.backends import fake_backends
from bai_agent.testing.deferreds import result_of
from bai_agent.testing.fake_docker import FakeDockerBackend
from bai_agent.testing.fake_runner import FakeRunners
from bai_agent.testing.memory_etcd import MemoryEtcd
from tests import amp_strategies as boxes

AGENT_ID = "fuzz-1"
KNOWN_KERNELS = ("k1", "k2")
#: Longest an answer may take, in fake seconds: Execute waits up to flush_timeout (300 s).
LONGEST_WAIT = 320.0
STEP = 2.0

#: BAI_FUZZ_SCALE=10 (say) fuzzes ten times longer than the default quick run.
SCALE = max(1, int(os.environ.get("BAI_FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=150 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


class Agent:
    """A whole agent on a MemoryReactorClock, with disk work done at once."""

    def __init__(self, root):
        self.reactor = MemoryReactorClock()
        self.etcd = MemoryEtcd(clock=self.reactor)
        self.docker = FakeDockerBackend()
        self.docker.add_image(boxes.IMAGE, {"ai.backend.kernelspec": "1"})
        self.docker.add_image("plain/debian:12", {})
        self.runners = FakeRunners()
        (root / "data" / "set").mkdir(parents=True)
        self.config = AgentConfig(
            agent_id=AGENT_ID,
            namespace="fuzz",
            amp_endpoint="tcp:7001",
            http_endpoint="tcp:7003:interface=127.0.0.1",
            scratch_root=str(root / "scratch"),
            state_dir=str(root / "state"),
            kernel_network="none",
            allowed_mount_roots=(str(root / "data"),),
            scratch_type="dir",  # homes stay plain directories in unit tests
        )
        prepare_directories(self.config)
        backends = fake_backends(
            self.reactor, self.config.scratch_root, docker=self.docker, etcd=self.etcd, runners=self.runners
        )
        self.service = build_agent_service(self.reactor, self.config, backends)
        self.service.privilegedStartService()
        self.service.startService()
        self.reactor.advance(0)
        self.registry = self.service.kernels
        self.factory = AgentAMPFactory(self.service.amp)
        assert self.service.amp.secret(), "the agent has no secret: MemoryEtcd bootstrap did not run"
        assert self.registry.recovered

    def stop(self):
        if self.service.running:
            self.service.stopService()
            self.reactor.advance(5)

    # -- connections ---------------------------------------------------------------------

    def connect(self, authenticate=True):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        manager = boxes.RawManager()
        client, server, pump = iosim.connectedServerAndClient(
            lambda: server, lambda: amp.BinaryBoxProtocol(manager), greet=True, clock=self.reactor
        )
        connection = Connection(self, manager, server, pump)
        if authenticate:
            connection.authenticate()
        return connection

    # -- kernels -------------------------------------------------------------------------

    def ensure_kernels(self):
        """Make the known kernels exist and run, whatever the last example did to them."""
        for kernel_id in KNOWN_KERNELS:
            kernel = self.registry.kernels.get(kernel_id)
            if kernel is not None and kernel.status == states.RUNNING and kernel.terminated is None:
                continue
            if kernel is not None:
                self.registry.destroy(kernel_id).addErrback(lambda failure: None)
                self.reactor.advance(0)
            results = []
            self.registry.create(kernel_id, boxes.IMAGE, {"cpu": 0.5, "mem": "128m"}).addBoth(results.append)
            self.reactor.advance(0)
            assert results and isinstance(results[0], dict), f"could not make kernel {kernel_id}: {results}"

    def our_containers(self):
        return result_of(self.docker.list_containers(labels={AGENT_ID_LABEL: AGENT_ID}, all=True))


class Connection:
    def __init__(self, agent, manager, server, pump):
        self.agent = agent
        self.manager = manager
        self.server = server
        self.pump = pump

    @property
    def closed(self):
        transport = self.server.transport
        return self.manager.lost or transport is None or bool(transport.disconnecting)

    def call(self, box):
        """Send ``box`` and wait (in fake time) for its answer; None when none came."""
        tag = self.manager.send(box)
        self.pump.flush()
        waited = 0.0
        while tag not in self.manager.answers and not self.closed and waited < LONGEST_WAIT:
            # Small steps, delivering as time goes: the agent's heartbeat pings must be
            # answered or it rightly drops the connection as silent.
            self.agent.reactor.advance(STEP)
            waited += STEP
            self.pump.flush()
        return self.manager.answers.pop(tag, None)

    def authenticate(self):
        hello = self.call({amp.COMMAND: b"Hello"})
        assert amp.ANSWER in hello, hello
        answer = self.call(
            {
                amp.COMMAND: b"Authenticate",
                b"mac": compute_mac(self.agent.service.amp.secret(), hello[b"nonce"]).encode(),
            }
        )
        assert amp.ANSWER in answer, answer

    def ping_works(self, payload=b"still there"):
        answer = self.call({amp.COMMAND: b"Ping", b"payload": payload})
        return answer is not None and answer.get(b"payload") == payload


@pytest.fixture
def agent(tmp_path):
    agent = Agent(tmp_path)
    yield agent
    agent.stop()


def describe(box):
    return {key: (value[:80] + b"..." if len(value) > 80 else value) for key, value in box.items()}


def fits_unauthenticated(box):
    """
    Whether ``box``, sent with an ``_ask`` tag of 1 to 8 digits, fits the box limit of an
    unauthenticated connection; None when it depends on the tag's length.
    """
    if len(box) + 1 > UNAUTHENTICATED.max_keys:
        return False
    size = len(boxes.serialise({**box, amp.ASK: b""}))
    if size + 8 <= UNAUTHENTICATED.max_bytes:
        return True
    return None if size + 1 <= UNAUTHENTICATED.max_bytes else False


def check_call(connection, box):
    command = commands.COMMANDS_BY_NAME[box[amp.COMMAND]]
    answer = connection.call(box)
    assert not connection.closed, f"the agent dropped the connection on {describe(box)}"
    assert answer is not None, f"no answer to {describe(box)}"
    problem = boxes.answer_problem(command, answer)
    assert problem is None, f"{problem}\n  for {describe(box)}"
    assert connection.ping_works(), f"Ping failed after {describe(box)}"
    return answer


# -- the contract under fuzzing ------------------------------------------------------------


@FUZZ
@given(box=boxes.any_command_box(kernel_ids=st.sampled_from(KNOWN_KERNELS)))
def test_every_command_answers_by_its_contract_and_the_connection_stays(agent, box):
    agent.ensure_kernels()
    connection = agent.__dict__.setdefault("fuzz_connection", None) or agent.connect()
    agent.fuzz_connection = connection
    check_call(connection, box)


def _command_fuzz_test(command):
    # One test function per command (not parametrize: pytest-twisted wraps a hypothesis
    # test's inner function once per function object, and parametrized items share it).
    @settings(FUZZ, max_examples=25 * SCALE)
    @given(box=boxes.command_box(command, kernel_ids=st.sampled_from(KNOWN_KERNELS)))
    def test(agent, box):
        agent.ensure_kernels()
        connection = agent.__dict__.setdefault("fuzz_connection", None) or agent.connect()
        agent.fuzz_connection = connection
        check_call(connection, box)

    test.__name__ = f"test_{command.commandName.decode()}_under_fuzzing_answers_by_its_contract"
    test.__doc__ = "Every command gets its own share of examples, whatever the mixed draw favours."
    return test


for _command in boxes.FUZZED_COMMANDS:
    _test = _command_fuzz_test(_command)
    globals()[_test.__name__] = _test
del _command, _test


def test_subscribe_since_far_in_the_future_is_answered_by_the_contract(agent):
    connection = agent.connect()
    for since in (b"1000000", str(2**63 - 1).encode(), str(2**63).encode(), str(10**30).encode()):
        check_call(connection, {amp.COMMAND: b"Subscribe", b"since": since})


WELL_FORMED = [
    (commands.Hello, {}),
    (commands.Ping, {"payload": "p"}),
    (commands.GetAgentInfo, {}),
    (commands.ListImages, {}),
    (commands.ListKernels, {}),
    (commands.CreateKernel, {"kernel_id": "new", "image": boxes.IMAGE, "resources": {"cpu": 1, "mem": "128m"}}),
    (commands.DestroyKernel, {"kernel_id": "k2"}),
    (commands.RestartKernel, {"kernel_id": "k1"}),
    (commands.Execute, {"kernel_id": "k1", "mode": "query", "code": "print(1)", "options": {"flush_timeout": 1}}),
    (commands.GetCompletions, {"kernel_id": "k1", "text": "pri"}),
    (commands.UploadFile, {"kernel_id": "k1", "path": "d/a.txt", "data": b"x" * 70000, "append": False}),
    (commands.DownloadFile, {"kernel_id": "k1", "path": "d/a.txt", "offset": 0, "length": 10}),
    (commands.ListFiles, {"kernel_id": "k1", "path": "d"}),
    (commands.GetLogs, {"kernel_id": "k1", "tail": 10}),
    (commands.ListServices, {"kernel_id": "k1"}),
    (commands.Subscribe, {"since": 0}),
    (commands.Reset, {}),
]


def test_well_formed_calls_of_every_command_are_answered(agent):
    """The sender and the judge themselves: what a good manager sends gets real answers."""
    assert {command for command, _ in WELL_FORMED} | {
        commands.Authenticate,
        commands.GetKernelStats,
        commands.InterruptKernel,
        # The fake kernels' image declares no services: these are answered SERVICE_NOT_FOUND
        # (tests/functional/test_services_real.py starts and stops real ones).
        commands.StartService,
        commands.StopService,
        # No registry offers the fake's pulls (IMAGE_NOT_FOUND), and the kernels run the
        # one image (IMAGE_IN_USE): tests/unit/test_image_pulls.py has the answers.
        commands.PullImage,
        commands.RemoveImage,
    } == set(commands.MANAGER_TO_AGENT)
    agent.ensure_kernels()
    connection = agent.connect()
    for command, values in WELL_FORMED:
        answer = check_call(connection, boxes.valid_box(command, **values))
        assert amp.ANSWER in answer, (command.commandName, answer)
    # Unknown kernels are KERNEL_NOT_FOUND for every kernel command.
    for command in boxes.FUZZED_COMMANDS:
        if command.arguments and command.arguments[0][0] == b"kernel_id" and command is not commands.CreateKernel:
            values = {
                "kernel_id": "nobody",
                "mode": "query",
                "code": "",
                "text": "",
                "path": "a",
                "data": b"",
                "append": False,
                "offset": 0,
                "length": 1,
                "service": "jupyter",
            }
            answer = check_call(connection, boxes.valid_box(command, **values))
            if command is commands.GetKernelStats and answer.get(amp.ERROR_CODE) == amp.UNHANDLED_ERROR_CODE:
                continue
            assert answer.get(amp.ERROR_CODE) == b"KERNEL_NOT_FOUND", (command.commandName, answer)


# -- sessions ----------------------------------------------------------------------------


@FUZZ
@given(box=boxes.any_command_box(kernel_ids=st.sampled_from(KNOWN_KERNELS)))
def test_unauthenticated_connection_gets_not_authenticated_for_all_but_hello(agent, box):
    connection = agent.__dict__.setdefault("anonymous", None) or agent.connect(authenticate=False)
    agent.anonymous = connection
    fits = fits_unauthenticated(box)
    answer = connection.call(box)
    if not fits and (fits is False or connection.closed):
        # Past the box limit of an unauthenticated connection: closed, whatever the command.
        assert connection.closed, f"an unauthenticated connection sent {describe(box)} and stayed"
        agent.anonymous = None
        return
    assert not connection.closed, f"dropped on {describe(box)}"
    assert answer is not None
    if box[amp.COMMAND] == commands.Hello.commandName:
        assert amp.ANSWER in answer
    else:
        assert answer.get(amp.ERROR_CODE) == b"NOT_AUTHENTICATED", (describe(box), answer)
    assert agent.registry.kernels == {}, "an unauthenticated call changed the agent"


@FUZZ
@given(entries=boxes.command_box(commands.Authenticate), first=st.booleans())
def test_authenticate_with_any_mac_is_answered_and_refused(agent, entries, first):
    connection = agent.connect(authenticate=False)
    if first:
        connection.call({amp.COMMAND: b"Hello"})
    fits = fits_unauthenticated(entries)
    answer = connection.call(entries)
    if not fits and (fits is False or connection.closed):
        assert connection.closed, f"an unauthenticated connection sent {describe(entries)} and stayed"
        return
    assert answer is not None and not connection.closed
    assert answer.get(amp.ERROR_CODE) in (b"AUTH_FAILED", b"INVALID_REQUEST"), (describe(entries), answer)
    assert connection.call({amp.COMMAND: b"GetAgentInfo"}).get(amp.ERROR_CODE) == b"NOT_AUTHENTICATED"


@FUZZ
@given(box=boxes.any_command_box(kernel_ids=st.sampled_from(KNOWN_KERNELS)))
def test_commands_that_ask_no_answer_get_none_and_the_connection_stays(agent, box):
    """A box without ``_ask`` wants no answer; whether it succeeds or not, the connection stays."""
    agent.ensure_kernels()
    connection = agent.connect()
    connection.manager.sender.transport.write(boxes.serialise(box))
    connection.pump.flush()
    agent.reactor.advance(0)
    connection.pump.flush()
    assert connection.manager.answers == {}
    assert not connection.closed, f"dropped on {describe(box)}"
    assert connection.ping_works()


def test_a_failing_command_without_ask_does_not_drop_the_connection(agent):
    connection = agent.connect()
    connection.manager.sender.transport.write(boxes.serialise({amp.COMMAND: b"GetLogs", b"kernel_id": b"nobody"}))
    connection.pump.flush()
    assert not connection.closed, "a declared error of an answer-less command dropped the connection"
    assert connection.ping_works()


# -- leaks -------------------------------------------------------------------------------

lifecycle_ids = st.sampled_from(["a", "b", "c"])
lifecycle_step = st.one_of(
    st.tuples(st.just("create"), boxes.command_box(commands.CreateKernel, kernel_ids=lifecycle_ids, extras=False)),
    st.tuples(
        st.just("create"),
        st.builds(
            lambda kernel_id, cpu, mem: boxes.valid_box(
                commands.CreateKernel, kernel_id=kernel_id, image=boxes.IMAGE, resources={"cpu": cpu, "mem": mem}
            ),
            lifecycle_ids,
            st.sampled_from([0.5, 1, 2, 3, 4, 5]),
            st.sampled_from(["64m", "1g", "4g", "7g", "9g"]),
        ),
    ),
    st.tuples(st.just("destroy"), boxes.command_box(commands.DestroyKernel, kernel_ids=lifecycle_ids, extras=False)),
    st.tuples(st.just("restart"), boxes.command_box(commands.RestartKernel, kernel_ids=lifecycle_ids, extras=False)),
    st.tuples(st.just("reset"), st.just(boxes.valid_box(commands.Reset))),
    st.tuples(st.just("runner-fails"), st.none()),
    st.tuples(st.just("container-dies"), lifecycle_ids),
)


def assert_books_balance(agent):
    """What the allocator holds, what Docker runs and what the registry knows agree."""
    kernels = agent.registry.kernels
    used = agent.registry.allocator.used()
    assert used["cpu"] == pytest.approx(sum(kernel.grant.cpu for kernel in kernels.values()))
    assert used["mem"] == sum(kernel.grant.mem for kernel in kernels.values())
    known = {kernel.container_id for kernel in kernels.values()}
    for container in agent.our_containers():
        assert container["Id"] in known, f"container {container['Names']} is unknown to the registry"


@settings(FUZZ, max_examples=40 * SCALE)
@given(steps=st.lists(lifecycle_step, max_size=12))
def test_random_creates_and_destroys_leak_nothing(agent, steps):
    connection = agent.__dict__.setdefault("fuzz_connection", None) or agent.connect()
    agent.fuzz_connection = connection
    for kernel_id in KNOWN_KERNELS:
        if kernel_id in agent.registry.kernels:
            connection.call(boxes.valid_box(commands.DestroyKernel, kernel_id=kernel_id))
    for action, argument in steps:
        if action == "runner-fails":
            agent.runners.fail_next()
        elif action == "container-dies":
            kernel = agent.registry.kernels.get(argument)
            if kernel is not None and kernel.container_id is not None and kernel.status == states.RUNNING:
                agent.docker.die(kernel.container_id, 1)
                agent.reactor.advance(0)
        else:
            check_call(connection, argument)
        assert_books_balance(agent)
    agent.runners._failures.clear()
    answer = check_call(connection, boxes.valid_box(commands.Reset))
    assert amp.ANSWER in answer
    agent.reactor.advance(STEP)
    assert agent.registry.kernels == {}
    assert agent.registry.allocator.used() == {"cpu": 0, "mem": 0, "cuda.device": 0, "scratch": 0}
    assert agent.our_containers() == []
    assert os.listdir(agent.config.scratch_root) == []
