"""
Two agents of one namespace on one machine and one Docker daemon (their own ids, ports,
scratch roots and state dirs): each sees and takes over only its own kernels, cleans
only its own leftovers, and both are registered.
"""

import signal

import pytest
import pytest_twisted

from tests.faults.helpers import AGENT_ID_LABEL, KERNEL_ID_LABEL, etcd_record, kernel_ids

pytestmark = pytest.mark.faults


@pytest_twisted.inlineCallbacks
def test_agents_side_by_side_keep_to_their_own_kernels(scenario):
    a = scenario.new_agent("side-a")
    b = scenario.new_agent("side-b")
    assert a.namespace == b.namespace
    for agent in (a, b):
        assert (
            etcd_record(agent.etcd_url, agent.namespace, agent.agent_id)["amp_endpoint"]
            == f"127.0.0.1:{agent.amp_port}"
        )
    watch_a, watch_b = scenario.recorder(a, "manager of a"), scenario.recorder(b, "manager of b")
    yield watch_a.connect()
    yield watch_b.connect()
    client_a = yield scenario.connect(a)
    client_b = yield scenario.connect(b)
    # The same kernel id on both: names and labels keep them apart.
    yield client_a.create_kernel("same", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client_a.create_kernel("only-a", scenario.image, {"cpu": 0.5, "mem": "64m"})
    yield client_b.create_kernel("same", scenario.image, {"cpu": 0.5, "mem": "64m"})
    for client in (client_a, client_b):
        yield client.execute("same", "query", "x = 41")
    yield client_a.execute("only-a", "query", "x = 41")
    assert kernel_ids((yield client_a.list_kernels())) == ["only-a", "same"]
    assert kernel_ids((yield client_b.list_kernels())) == ["same"]
    seen_a, seen_b = watch_a.last_acknowledged(), watch_b.last_acknowledged()

    # A dies; while it is away a create of A's is left half-done (a labelled container it
    # never saved, and its scratch dir). B must leave that alone, A must clean it.
    assert (yield scenario.stop_async(a, signal.SIGKILL)) == -signal.SIGKILL
    leftover = a.docker.create(
        scenario.image, {AGENT_ID_LABEL: a.agent_id, KERNEL_ID_LABEL: "half"}, name=f"kernel.{a.agent_id}.half"
    )
    (a.scratch_root / "half").mkdir(mode=0o700)
    assert (yield scenario.stop_async(b, signal.SIGKILL)) == -signal.SIGKILL
    yield scenario.start_async(b)  # B takes over first, with A's leftover in sight
    client_b = yield scenario.connect(b)
    assert kernel_ids((yield client_b.list_kernels())) == ["same"]
    assert a.docker.running(leftover), "B touched A's leftover"
    assert (a.scratch_root / "half").is_dir()
    assert (yield scenario.check_survivor(client_b, "same"))

    yield scenario.start_async(a)
    client_a = yield scenario.connect(a)
    assert kernel_ids((yield client_a.list_kernels())) == ["only-a", "same"]
    assert a.docker.inspect(leftover) is None
    assert scenario.stray_dirs(a, ["only-a", "same"]) == []
    for kernel_id in ("only-a", "same"):
        assert (yield scenario.check_survivor(client_a, kernel_id))
    assert kernel_ids((yield client_b.list_kernels())) == ["same"]
    for agent in (a, b):
        assert etcd_record(agent.etcd_url, agent.namespace, agent.agent_id) is not None

    watch_a.expect("kernel-terminated", "half", {"orphan-cleanup"}, after=seen_a)
    yield watch_a.settle()
    yield watch_b.settle()
    assert watch_b.events("kernel-terminated") == [], watch_b.report()
    assert [e["kernel_id"] for e in watch_a.events("kernel-terminated")] == ["half"], watch_a.report()
    assert seen_b < watch_b.last_acknowledged()  # B's restart was told

    leaks = yield scenario.clean_up(a, [watch_a])
    assert leaks == ([], [])
    # A's reset did not touch B's kernel of the same id.
    assert (yield scenario.check_survivor(client_b, "same"))
    leaks = yield scenario.clean_up(b, [watch_b])
    assert leaks == ([], [])
    assert scenario.figures.problems() == []
