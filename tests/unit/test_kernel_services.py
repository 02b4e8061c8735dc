"""
KernelServices on a MemoryReactorClock, a fake runner link and the fake Docker backend: what
it asks the runner, where its relay listens, what it answers and journals, and what it
refuses.
"""

import json

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from bai_agent.docker.images import KernelImage
from bai_agent.kernels import kernel as states
from bai_agent.protocol import errors, events
from bai_agent.services.kernel_services import KernelServices, is_service_message
from bai_agent.services.ports import PortPool
from bai_agent.testing.deferreds import failure_of, result_of
from bai_agent.testing.fake_docker import FakeDockerBackend

DEFINITION = {
    "command": ["/usr/bin/jupyter-notebook", "--port={port}", "--ip={host}", "--token={token}", "--dir={home}"],
    "url_template": "http://{host}:{port}/?token={token}",
}


class Link:
    alive = True

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class Journal:
    def __init__(self):
        self.events = []

    def append(self, kind, kernel_id=None, data=None):
        self.events.append((kind, kernel_id, data))


class Kernel:
    def __init__(self, container_id, labels):
        self.kernel_id = "k1"
        self.image = KernelImage(name="img", id="sha256:x", labels=labels)
        self.status = states.RUNNING
        self.container_id = container_id
        self.link = Link()


class Saves:
    """The services saved beside each kernel's state: the latest, and every save in order."""

    def __init__(self):
        self.latest = {}
        self.history = []

    def save(self, kernel_id, services):
        self.latest[kernel_id] = services
        self.history.append((kernel_id, services))
        return succeed(None)


@pytest.fixture
def saves():
    return Saves()


@pytest.fixture
def parts(saves):
    reactor = MemoryReactorClock()
    docker = FakeDockerBackend()
    docker.add_image("img", {"ai.backend.service-ports": "jupyter:http:8888,broken:http:9999"})
    docker.add_image_file("img", "/etc/backend.ai/service-defs/jupyter.json", json.dumps(DEFINITION).encode())
    docker.add_image_file("img", "/etc/backend.ai/service-defs/broken.json", b'{"command": "not a list"}')
    container_id = result_of(docker.create_container("c1", {"Image": "img"}))
    journal = Journal()
    services = KernelServices(
        reactor, docker, PortPool(reactor, 30000, 30002), "10.0.0.5", journal, lambda k: "/run/k", saves.save
    )
    kernel = Kernel(container_id, {"ai.backend.service-ports": "jupyter:http:8888,broken:http:9999"})
    return reactor, services, kernel, journal


def test_a_start_asks_the_runner_then_relays_a_pool_port_to_the_services_socket(parts):
    reactor, services, kernel, journal = parts
    answer = services.start(kernel, "jupyter")
    [message] = kernel.link.sent
    token = message["argv"][3].split("=", 1)[1]
    assert message["type"] == "start-service" and message["socket"] == "/run/bai/service-jupyter.sock"
    assert message["argv"] == [
        "/usr/bin/jupyter-notebook",
        "--port=8888",
        "--ip=127.0.0.1",
        f"--token={token}",
        "--dir=/home/work",
    ]
    assert len(token) == 48 and message["port"] == 8888 and message["timeout"] == 30.0
    assert not answer.called and not reactor.tcpServers  # nothing listens before the service does
    services.handle(kernel, {"type": "service-started", "name": "jupyter"})
    [(port, _factory, _backlog, host)] = reactor.tcpServers
    assert (port, host) == (30000, "10.0.0.5")
    endpoint = result_of(answer)
    assert endpoint == {
        "service": "jupyter",
        "protocol": "http",
        "host": "10.0.0.5",
        "port": 30000,
        "url": f"http://10.0.0.5:30000/?token={token}",
    }
    assert result_of(services.start(kernel, "jupyter")) == endpoint  # the same, no new start
    assert len(kernel.link.sent) == 1
    assert journal.events[-1][0] == events.SERVICE_STARTED
    services.handle(kernel, {"type": "service-exited", "name": "jupyter", "exit_code": 3, "output": ""})
    assert journal.events[-1] == (
        events.SERVICE_STOPPED,
        "k1",
        {"service": "jupyter", "exit_code": 3, "reason": "exited"},
    )
    assert services.ports.is_cooling(30000)
    [entry] = [e for e in services.listing(kernel) if e["name"] == "jupyter"]
    assert (entry["status"], entry["port"], entry["url"]) == ("exited", None, None)


def test_a_service_that_fails_answers_start_failed_with_its_output(parts):
    _reactor, services, kernel, _journal = parts
    answer = services.start(kernel, "jupyter")
    services.handle(
        kernel, {"type": "service-failed", "name": "jupyter", "reason": "exited with 1", "output": "Traceback: boom\n"}
    )
    error = failure_of(answer).value
    assert isinstance(error, errors.ServiceStartFailed) and "boom" in str(error)
    assert services.ports.in_use == 0


def test_undeclared_badly_defined_and_malformed_requests_are_refused(parts):
    _reactor, services, kernel, _journal = parts
    with pytest.raises(errors.ServiceNotFound):
        services.start(kernel, "sshd")
    assert isinstance(failure_of(services.start(kernel, "broken")).value, errors.ServiceNotFound)
    for name in ("../x", "", "J", "a" * 33, 5):
        with pytest.raises(errors.InvalidRequest):
            services.start(kernel, name)
    for options in ([], {"timeout": 0}, {"timeout": 121}, {"timeout": True}, {"argv": ["sh"]}):
        with pytest.raises(errors.InvalidRequest):
            services.start(kernel, "jupyter", options)
    # A manager's option names are never echoed: one could fill a whole AMP value.
    with pytest.raises(errors.InvalidRequest) as refused:
        services.start(kernel, "jupyter", {"k" * 60000: 1})
    assert len(str(refused.value)) < 200
    with pytest.raises(errors.ServiceNotFound):
        services.stop(kernel, "jupyter")
    kernel.status = states.RESTARTING
    with pytest.raises(errors.KernelNotRunning):
        services.start(kernel, "jupyter")


def test_the_end_of_the_kernel_closes_every_relay_and_frees_its_ports(parts):
    reactor, services, kernel, journal = parts
    answer = services.start(kernel, "jupyter")
    services.handle(kernel, {"type": "service-started", "name": "jupyter"})
    port = result_of(answer)["port"]
    services.kernel_stopping(kernel, events.USER_REQUESTED)
    assert services.ports.owned_by("k1") == [] and services.ports.is_cooling(port)
    assert journal.events[-1][2]["reason"] == events.USER_REQUESTED
    assert services.records("k1") == []


def test_service_messages_are_told_from_run_messages():
    assert is_service_message({"type": "service-exited", "name": "x"})
    assert is_service_message({"type": "error", "code": "NO_SUCH_SERVICE", "name": "x"})
    assert not is_service_message({"type": "error", "code": "RUN_CONFLICT", "run_id": "r"})
    assert not is_service_message({"type": "output", "run_id": "r"})


def started(services, kernel, name="jupyter"):
    answer = services.start(kernel, name)
    services.handle(kernel, {"type": "service-started", "name": name})
    return result_of(answer)


def next_run(parts, saves):
    """The agent's next run: a new KernelServices over a new reactor, the same saves."""
    reactor, old, kernel, _ = parts
    new_reactor = MemoryReactorClock()
    journal = Journal()
    services = KernelServices(
        new_reactor,
        old.backend,
        PortPool(new_reactor, 30000, 30002),
        "10.0.0.5",
        journal,
        lambda k: "/run/k",
        saves.save,
    )
    adopted = Kernel(kernel.container_id, kernel.image.labels)
    return new_reactor, services, adopted, journal


def test_a_running_service_is_saved_before_it_is_answered(parts, saves):
    reactor, services, kernel, journal = parts
    hold = Deferred()
    services.save = lambda kernel_id, entries: saves.save(kernel_id, entries).addCallback(lambda _: hold)
    answer = services.start(kernel, "jupyter")
    services.handle(kernel, {"type": "service-started", "name": "jupyter"})
    [saved] = saves.latest["k1"]
    assert not answer.called and not any(kind == events.SERVICE_STARTED for kind, _, _ in journal.events)
    hold.callback(None)
    endpoint = result_of(answer)
    assert saved == {
        "name": "jupyter",
        "protocol": "http",
        "container_port": 8888,
        "port": endpoint["port"],
        "token": endpoint["url"].rsplit("=", 1)[1],
        "url_template": DEFINITION["url_template"],
    }
    services.handle(kernel, {"type": "service-exited", "name": "jupyter", "exit_code": 0})
    assert saves.latest["k1"] == []


def test_the_next_run_restores_the_relay_on_the_same_port_with_the_same_url(parts, saves):
    endpoint = started(parts[1], parts[2])
    reactor, services, kernel, journal = next_run(parts, saves)
    services.adopt(kernel, saves.latest["k1"])
    assert services.ports.owned_by("k1") == [endpoint["port"]]  # reserved before anything else runs
    assert services.ports.allocate("another kernel") != endpoint["port"]
    restored = services.restore(kernel)
    [(port, _factory, _backlog, host)] = reactor.tcpServers
    assert (host, port) == ("10.0.0.5", endpoint["port"])
    assert kernel.link.sent == [{"type": "list-services", "id": "services-restore"}]
    # A StartService meanwhile waits for the runner's answer, then answers the same endpoint.
    again = services.start(kernel, "jupyter")
    assert not again.called and not restored.called
    services.handle(
        kernel,
        {"type": "services", "id": "services-restore", "services": [{"name": "jupyter", "status": "running"}]},
    )
    assert result_of(restored) is None
    assert result_of(again) == endpoint
    assert len(kernel.link.sent) == 1  # nothing started again
    [record] = services.records("k1")
    assert record["url"] == endpoint["url"] and record["status"] == "running"
    assert journal.events == []  # managers were told it started; nothing changed


def test_a_service_that_ended_while_the_agent_was_away_is_reported_stopped(parts, saves):
    endpoint = started(parts[1], parts[2])
    reactor, services, kernel, journal = next_run(parts, saves)
    services.adopt(kernel, saves.latest["k1"])
    restored = services.restore(kernel)
    services.handle(
        kernel,
        {
            "type": "services",
            "id": "services-restore",
            "services": [
                {"name": "jupyter", "status": "exited", "exit_code": 9},
                {"name": "other", "status": "running"},
            ],
        },
    )
    result_of(restored)
    assert journal.events == [
        (events.SERVICE_STOPPED, "k1", {"service": "jupyter", "exit_code": 9, "reason": "exited"})
    ]
    assert services.ports.is_cooling(endpoint["port"]) and not services.relays()
    # One the agent never relayed (its start was cut short) has no client: it is stopped.
    assert kernel.link.sent[-1] == {"type": "stop-service", "name": "other"}
    assert saves.latest["k1"] == []


def test_a_port_taken_meanwhile_ends_the_service_rather_than_moving_it(parts, saves):
    from twisted.internet.error import CannotListenError

    started(parts[1], parts[2])
    reactor, services, kernel, journal = next_run(parts, saves)
    services.adopt(kernel, saves.latest["k1"])

    def taken(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError("in use"))

    reactor.listenTCP = taken
    restored = services.restore(kernel)
    assert journal.events[0][0] == events.SERVICE_STOPPED and journal.events[0][2]["reason"] == "lost"
    assert kernel.link.sent[0] == {"type": "stop-service", "name": "jupyter"}
    services.handle(kernel, {"type": "services", "id": "services-restore", "services": []})
    result_of(restored)
    assert services.ports.owned_by("k1") == []


def test_malformed_saved_services_are_not_restored(parts, saves):
    reactor, services, kernel, journal = next_run(parts, saves)
    good = {
        "name": "jupyter",
        "protocol": "http",
        "container_port": 8888,
        "port": 30001,
        "token": "a" * 48,
        "url_template": "http://{host}:{port}/?token={token}",
    }
    bad = [
        "not an object",
        dict(good, name="../x"),
        dict(good, port=70000),
        dict(good, port=True),
        dict(good, protocol="gopher"),
        dict(good, token="short"),
        dict(good, url_template="{nope}"),
        dict(good, url_template=5),
    ]
    services.adopt(kernel, bad)
    services.adopt(kernel, {"not": "a list"})
    assert services.records("k1") == [] and services.ports.in_use == 0
    services.adopt(kernel, [good, good])  # a name twice: the first wins
    assert [r["status"] for r in services.records("k1")] == ["restoring"]


def test_a_runner_that_does_not_answer_still_lets_the_take_over_finish(parts, saves):
    started(parts[1], parts[2])
    reactor, services, kernel, journal = next_run(parts, saves)
    services.adopt(kernel, saves.latest["k1"])
    restored = services.restore(kernel)
    assert not restored.called
    reactor.advance(10)
    assert result_of(restored) is None
    assert [r["status"] for r in services.records("k1")] == ["running"]


def test_the_status_page_records_hide_the_token(parts):
    _, services, kernel, _ = parts
    endpoint = started(services, kernel)
    token = endpoint["url"].rsplit("=", 1)[1]
    [hidden] = services.records("k1", reveal=False)
    assert token not in str(hidden) and hidden["url"] == f"http://10.0.0.5:{endpoint['port']}/?token=HIDDEN"
    assert services.records("k1")[0]["url"] == endpoint["url"]
