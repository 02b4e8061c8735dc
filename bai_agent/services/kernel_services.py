"""
The services of every kernel (docs/protocol.md section 7): ``StartService``,
``StopService`` and ``ListServices``, and the end of a kernel's services with its kernel.

For each service started, the agent reads the image's definition from the container
(Docker resolves the path inside it), makes a token, asks the runner to start the
program (``start-service``: the runner relays its UNIX socket in the kernel's run
directory to the container's loopback port), and once the runner says it listens,
listens on a host port of the pool with a ``ServiceRelay`` to that socket. A service
that exits, is stopped, or whose kernel restarts or ends gets its relay closed and its
host port released (into the pool's cool-down), and ``service-stopped`` is journalled.

Tokens appear in answers (``url``) and nowhere in the logs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.logger import Logger

from bai_agent.docker.interface import DockerError, DockerNotFound
from bai_agent.kernels import kernel as states
from bai_agent.protocol import errors, events
from bai_agent.services.declarations import (
    MAX_DEFINITION_BYTES,
    NAME_PATTERN,
    ServiceDeclarationError,
    ServiceDefinition,
    declared_services,
    parse_service_definition,
    render,
    url,
)
from bai_agent.services.ports import PortPool, PortsExhausted
from bai_agent.services.relay import RelayCounters, RelayListenError, ServiceRelay

if TYPE_CHECKING:
    from bai_agent.kernels.kernel import Kernel

DEFINITIONS_DIR = "/etc/backend.ai/service-defs"
#: Where the runner's state directory (the kernel's run dir) is inside the container.
CONTAINER_RUN_DIR = "/run/bai"
HOME = "/home/work"
START_TIMEOUT = 30.0
MAX_START_TIMEOUT = 120.0
#: How long a StopService waits for the runner to report the end (it SIGKILLs after 5 s).
STOP_WAIT = 10.0
#: The tail of a failed service's output kept in the error's message.
MESSAGE_TAIL = 4096
#: Runner messages that are about services (an ``error`` with a ``name`` is one too).
RUNNER_MESSAGES = frozenset({"service-started", "service-failed", "service-exited", "services"})

log = Logger()


def is_service_message(message: dict[str, Any]) -> bool:
    kind = message.get("type")
    return kind in RUNNER_MESSAGES or (kind == "error" and "name" in message and "run_id" not in message)


@attrs.define(eq=False)
class Service:
    """One service of one kernel, as the agent holds it."""

    name: str
    protocol: str
    container_port: int
    status: str = "starting"  # starting, running, exited
    port: int | None = None  # the host port, while running
    url: str | None = None
    exit_code: int | None = None
    relay: ServiceRelay | None = None
    definition: ServiceDefinition | None = None
    token: str | None = attrs.field(default=None, repr=False)
    #: The StartService calls waiting while it starts; each gets the answer or the error.
    waiters: list[Deferred[dict[str, Any]]] = attrs.Factory(list)
    timer: Any = None
    stopped: Deferred[None] | None = None  # fires on service-exited

    def wait(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.waiters.append(d)
        return d

    def settle(self, result: Any) -> None:
        """Answer every waiting StartService with ``result`` (an answer, or an ``AgentError``)."""
        waiters, self.waiters = self.waiters, []
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for d in waiters:
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(result)

    def entry(self, host: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "container_port": self.container_port,
            "status": self.status,
            "host": host if self.port is not None else None,
            "port": self.port,
            "url": self.url,
        }

    def answer(self, host: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"service": self.name, "protocol": self.protocol, "host": host, "port": self.port}
        if self.url is not None:
            answer["url"] = self.url
        return answer


class KernelServices:
    """
    :param reactor: timers, TCP listening and UNIX connections of the relays.
    :param backend: the ``IDockerBackend`` the definitions are read through.
    :param ports: the ``PortPool`` of ``--service-port-range``.
    :param host: where the relays listen and what answers name (``--service-host``).
    :param journal: the ``EventJournal``.
    :param run_dir: ``kernel_id -> the kernel's run dir on the host``.
    """

    def __init__(
        self,
        reactor: Any,
        backend: Any,
        ports: PortPool,
        host: str,
        journal: Any,
        run_dir: Callable[[str], str],
    ) -> None:
        self.reactor = reactor
        self.backend = backend
        self.ports = ports
        self.host = host
        self.journal = journal
        self.run_dir = run_dir
        self._services: dict[str, dict[str, Service]] = {}  # kernel id -> name -> service
        self._closed = RelayCounters()  # what the relays closed so far did (counters never go down)

    # -- what managers ask ----------------------------------------------------------------

    def declared(self, kernel: Kernel) -> dict[str, Any]:
        return declared_services(kernel.image.labels, log)

    def listing(self, kernel: Kernel) -> list[dict[str, Any]]:
        held = self._services.get(kernel.kernel_id, {})
        entries = []
        for name, declared in sorted(self.declared(kernel).items()):
            service = held.get(name)
            if service is None:
                service = Service(name, declared.protocol, declared.port, status="declared")
            entries.append(service.entry(self.host))
        return entries

    def start(self, kernel: Kernel, name: Any, options: Any = None) -> Deferred[dict[str, Any]]:
        _check_name(name)
        timeout = _start_timeout(options)
        if kernel.status != states.RUNNING:
            raise errors.KernelNotRunning(f"kernel {kernel.kernel_id} is {kernel.status}")
        declared = self.declared(kernel).get(name)
        if declared is None:
            raise errors.ServiceNotFound(f"the image of kernel {kernel.kernel_id} declares no service {name!r}")
        if kernel.link is None or not kernel.link.alive:
            raise errors.BackendUnavailable(
                f"kernel {kernel.kernel_id}: the agent is reconnecting to its runner, retry"
            )
        held = self._services.setdefault(kernel.kernel_id, {})
        service = held.get(name)
        if service is not None and service.status == "running":
            return succeed(service.answer(self.host))
        if service is not None and service.status == "starting":
            return service.wait()
        service = held[name] = Service(name, declared.protocol, declared.port)
        answer = service.wait()
        self._start(kernel, service, timeout).addErrback(self._start_failed, service)
        return answer

    def stop(self, kernel: Kernel, name: Any) -> Deferred[None]:
        _check_name(name)
        service = self._services.get(kernel.kernel_id, {}).get(name)
        if service is None or service.status == "exited":
            raise errors.ServiceNotFound(f"kernel {kernel.kernel_id} runs no service {name!r}")
        return self._stop(kernel, service)

    # -- the kernel's life --------------------------------------------------------------------

    def kernel_stopping(self, kernel: Kernel, reason: str) -> Deferred[None]:
        """The kernel restarts or ends: every relay closes and every port is released."""
        services = self._services.pop(kernel.kernel_id, {})
        waits = [self._ended(kernel, service, None, reason) for service in services.values()]
        self.ports.release_owner(kernel.kernel_id)
        return _all(waits)

    def handle(self, kernel: Kernel, message: dict[str, Any]) -> None:
        """A message of the kernel's runner about a service."""
        service = self._services.get(kernel.kernel_id, {}).get(str(message.get("name")))
        if service is None:
            return
        kind = message.get("type")
        if kind == "service-started":
            if service.status == "starting" and service.relay is None:
                self._listen(kernel, service)
        elif kind in ("service-failed", "error"):
            reason = message.get("reason") or message.get("message") or "failed"
            self._fail_start(service, _failure_message(service.name, str(reason), message.get("output")))
        elif kind == "service-exited":
            if service.status == "starting":
                exit_code = message.get("exit_code")
                self._fail_start(
                    service,
                    _failure_message(service.name, f"exited with code {exit_code}", message.get("output")),
                )
            self._ended(kernel, service, message.get("exit_code"), "exited")
            if service.stopped is not None and not service.stopped.called:
                service.stopped.callback(None)

    def records(self, kernel_id: str) -> list[dict[str, Any]]:
        """The kernel record's ``services``: those started, with their endpoints."""
        return [service.entry(self.host) for service in self._services.get(kernel_id, {}).values()]

    def relay_totals(self) -> dict[str, int]:
        """Relayed connections and bytes since the agent started, and the services running now."""
        relays = self.relays()
        sums = RelayCounters()
        for counters in [self._closed, *(relay.counters for relay in relays)]:
            sums.add(counters)
        return dict(attrs.asdict(sums), running=len(relays))

    def relays(self) -> list[ServiceRelay]:
        return [
            service.relay
            for services in self._services.values()
            for service in services.values()
            if service.relay is not None
        ]

    # -- inside ------------------------------------------------------------------------------

    @inlineCallbacks
    def _start(self, kernel: Kernel, service: Service, timeout: float) -> Generator[Deferred[Any], Any, None]:
        definition = service.definition = yield self._definition(kernel, service.name)
        token = service.token = secrets.token_hex(24)
        argv, env = render(definition, service.container_port, token, HOME)
        if kernel.link is None or service.status != "starting":
            raise errors.BackendUnavailable(f"kernel {kernel.kernel_id}: the link to its runner is gone, retry")
        kernel.link.send(
            {
                "type": "start-service",
                "name": service.name,
                "argv": argv,
                "env": env,
                "port": service.container_port,
                "socket": _socket(service.name, CONTAINER_RUN_DIR),
                "timeout": timeout,
            }
        )
        service.timer = self.reactor.callLater(
            timeout + 5,
            self._fail_start,
            service,
            f"service {service.name} did not answer within {timeout + 5:g}s",
        )

    @inlineCallbacks
    def _definition(self, kernel: Kernel, name: str) -> Generator[Deferred[Any], Any, ServiceDefinition]:
        path = f"{DEFINITIONS_DIR}/{name}.json"
        try:
            data = yield self.backend.read_file(kernel.container_id, path, MAX_DEFINITION_BYTES)
        except DockerNotFound:
            raise errors.ServiceNotFound(
                f"the image of kernel {kernel.kernel_id} declares {name!r} but has no definition {path}"
            ) from None
        except DockerError as e:
            raise errors.ServiceNotFound(f"the definition {path} of service {name!r} cannot be read: {e}") from None
        try:
            return parse_service_definition(data, name)
        except ServiceDeclarationError as e:
            log.warn(
                "kernel {kernel_id}: service {name} is not offered: {error}",
                kernel_id=kernel.kernel_id,
                name=name,
                error=str(e),
            )
            raise errors.ServiceNotFound(f"service {name!r} is not offered: {e}") from None

    def _listen(self, kernel: Kernel, service: Service) -> None:
        relay = ServiceRelay(self.reactor, _socket(service.name, self.run_dir(kernel.kernel_id)))
        d = self.ports.allocate_bound(kernel.kernel_id, lambda port: relay.listen(self.reactor, self.host, port))

        def listening(result: tuple[int, Any]) -> None:
            port = result[0]
            if service.status != "starting" or service.definition is None or service.token is None:
                relay.stop()  # it failed or was stopped meanwhile
                self.ports.release(port)
                return
            service.relay, service.port, service.status = relay, port, "running"
            service.url = url(service.definition, self.host, port, service.token)
            self.journal.append(
                events.SERVICE_STARTED,
                kernel.kernel_id,
                {"service": service.name, "protocol": service.protocol, "host": self.host, "port": port},
            )
            log.info(
                "kernel {kernel_id}: service {name} on {host}:{port}",
                kernel_id=kernel.kernel_id,
                name=service.name,
                host=self.host,
                port=port,
            )
            service.settle(service.answer(self.host))

        def cannot(failure: Any) -> None:
            failure.trap(PortsExhausted, RelayListenError)
            self._fail_start(service, f"service {service.name} has no host port: {failure.getErrorMessage()}")
            if kernel.link is not None and kernel.link.alive:
                kernel.link.send({"type": "stop-service", "name": service.name})

        d.addCallbacks(listening, cannot)
        d.addErrback(lambda failure: self._fail_start(service, failure.getErrorMessage()))

    def _fail_start(self, service: Service, message: str) -> None:
        self._start_failed(errors.ServiceStartFailed(message), service)

    def _start_failed(self, failure: Any, service: Service) -> None:
        if service.status == "starting":
            service.status = "exited"
            error = failure.value if hasattr(failure, "value") else failure
            if not isinstance(error, errors.AgentError):
                error = errors.ServiceStartFailed(f"service {service.name} could not start: {error}")
            service.settle(error)

    @inlineCallbacks
    def _stop(self, kernel: Kernel, service: Service) -> Generator[Deferred[Any], Any, None]:
        if kernel.link is not None and kernel.link.alive:
            service.stopped = Deferred()
            kernel.link.send({"type": "stop-service", "name": service.name})
            timer = self.reactor.callLater(STOP_WAIT, service.stopped.callback, None)
            yield service.stopped
            if timer.active():
                timer.cancel()
        self._fail_start(service, f"service {service.name} was stopped")
        yield self._ended(kernel, service, service.exit_code, "stopped")

    def _ended(self, kernel: Kernel, service: Service, exit_code: Any, reason: str) -> Deferred[None]:
        if service.status == "starting":
            self._fail_start(service, f"service {service.name} ended before it listened ({reason})")
        was_running = service.status == "running"
        service.status = "exited"
        if isinstance(exit_code, int) and not isinstance(exit_code, bool):
            service.exit_code = exit_code
        relay, service.relay = service.relay, None
        port, service.port = service.port, None
        service.url = None
        if port is not None:
            self.ports.release(port)
        if was_running:
            self.journal.append(
                events.SERVICE_STOPPED,
                kernel.kernel_id,
                {"service": service.name, "exit_code": service.exit_code, "reason": reason},
            )
        if relay is None:
            return succeed(None)
        return relay.stop().addCallback(lambda _: self._closed.add(relay.counters))


def _check_name(name: Any) -> None:
    # Never echoed back: a manager's bad value could be as long as an AMP value may be.
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise errors.InvalidRequest("service must be a name of [a-z][a-z0-9-]{0,31}")


def _socket(name: str, run_dir: str) -> str:
    return os.path.join(run_dir, f"service-{name}.sock")


def _start_timeout(options: Any) -> float:
    if options is None:
        return START_TIMEOUT
    if not isinstance(options, dict):
        raise errors.InvalidRequest("options must be an object")
    if set(options) - {"timeout"}:
        # The names are not echoed: a manager's could fill a whole AMP value.
        raise errors.InvalidRequest("StartService takes only the option timeout")
    timeout = options.get("timeout", START_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_START_TIMEOUT:
        raise errors.InvalidRequest(f"options.timeout must be seconds in (0, {MAX_START_TIMEOUT:g}]")
    return float(timeout)


def _failure_message(name: str, reason: str, output: Any) -> str:
    text = f"service {name} {reason}" if not reason.startswith(name) else reason
    if isinstance(output, str) and output:
        text += f"; its output ends with:\n{output[-MESSAGE_TAIL:]}"
    return text


def _all(waits: list[Deferred[Any]]) -> Deferred[None]:
    return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
