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

The running services of a kernel are saved beside its state (``save``, before a start is
answered), so that the take-over of the next run restores them: ``adopt`` reserves their
host ports (its first part), ``restore`` listens on them again once the runner is reached
and asks the runner which services still run (``list-services``): those that ended
meanwhile are reported stopped, those the agent does not know (a start cut short by the
agent's death) are stopped. A ``StartService`` meanwhile waits for that answer.

Tokens appear in answers (``url``) and nowhere in the logs or on the status page.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable, cast

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, inlineCallbacks, succeed
from twisted.logger import Logger

from bai_agent.docker.interface import DockerError, DockerNotFound
from bai_agent.kernels import kernel as states
from bai_agent.kernels.deferreds import share
from bai_agent.protocol import errors, events
from bai_agent.services.declarations import (
    MAX_DEFINITION_BYTES,
    NAME_PATTERN,
    PROTOCOLS,
    ServiceDeclarationError,
    ServiceDefinition,
    declared_services,
    parse_service_definition,
    render,
    url,
)
from bai_agent.services.ports import PortPool, PortsExhausted, PortTaken
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
#: The id of the take-over's ``list-services``.
RESTORE_ID = "services-restore"
#: How long the take-over waits for the runner's ``services`` answer.
RESTORE_WAIT = 10.0
#: What the status page shows in place of a token.
HIDDEN_TOKEN = "HIDDEN"

TOKEN_PATTERN = re.compile(r"[0-9a-f]{48}\Z")

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
    url_template: str | None = None
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

    def entry(self, host: str, reveal: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "container_port": self.container_port,
            "status": self.status,
            "host": host if self.port is not None else None,
            "port": self.port,
            "url": self.url if reveal else self.render_url(host, HIDDEN_TOKEN),
        }

    def render_url(self, host: str, token: str | None = None) -> str | None:
        """The URL a client opens (the relay's host and port); None without a template or a port."""
        if self.port is None or self.token is None:
            return None
        return url(self.url_template, host, self.port, token or self.token, HOME)

    def saved(self) -> dict[str, Any]:
        """What the take-over of the next run needs to restore it (``restored``)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "container_port": self.container_port,
            "port": self.port,
            "token": self.token,
            "url_template": self.url_template,
        }

    @classmethod
    def restored(cls, saved: Any) -> Service | None:
        """A service saved by the last run, ``restoring``; None if ``saved`` is not one."""
        if not isinstance(saved, dict):
            return None
        name, protocol, token, template = (saved.get(key) for key in ("name", "protocol", "token", "url_template"))
        container_port, port = saved.get("container_port"), saved.get("port")
        if not (isinstance(name, str) and NAME_PATTERN.match(name) and protocol in PROTOCOLS):
            return None
        if not (_is_port(container_port) and _is_port(port)):
            return None
        if not isinstance(token, str) or not TOKEN_PATTERN.match(token):
            return None
        if template is not None:
            try:
                url(template, "", 1, "", HOME)
            except (AttributeError, KeyError, ValueError, IndexError):
                return None
        return cls(
            name, protocol, cast(int, container_port), status="restoring", port=port, url_template=template, token=token
        )

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
    :param save: ``(kernel_id, [saved service]) -> Deferred``: keeps a kernel's running
        services beside its state, for the take-over of the next run.
    """

    def __init__(
        self,
        reactor: Any,
        backend: Any,
        ports: PortPool,
        host: str,
        journal: Any,
        run_dir: Callable[[str], str],
        save: Callable[[str, list[dict[str, Any]]], Deferred[Any]],
    ) -> None:
        self.reactor = reactor
        self.backend = backend
        self.ports = ports
        self.host = host
        self.journal = journal
        self.run_dir = run_dir
        self.save = save
        self._services: dict[str, dict[str, Service]] = {}  # kernel id -> name -> service
        self._saving: dict[str, DeferredLock] = {}  # kernel id -> one save at a time, in order
        self._reconciling: dict[str, Deferred[None]] = {}  # kernel id -> the take-over's list-services
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
        reconciling = self._reconciling.get(kernel.kernel_id)
        if reconciling is not None:
            # The take-over is still asking the runner what runs: answer from what it says.
            return share(reconciling).addCallback(lambda _: self.start(kernel, name, options))
        if kernel.status != states.RUNNING:
            raise errors.KernelNotRunning(f"kernel {kernel.kernel_id} is {kernel.status}")
        held = self._services.setdefault(kernel.kernel_id, {})
        service = held.get(name)
        if service is not None and service.status == "running":
            return succeed(service.answer(self.host))  # even if its image was removed since
        if service is not None and service.status == "starting":
            return service.wait()
        declared = self.declared(kernel).get(name)
        if declared is None:
            raise errors.ServiceNotFound(f"the image of kernel {kernel.kernel_id} declares no service {name!r}")
        if kernel.link is None or not kernel.link.alive:
            raise errors.BackendUnavailable(
                f"kernel {kernel.kernel_id}: the agent is reconnecting to its runner, retry"
            )
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
        self._end_reconciling(kernel.kernel_id)
        services = self._services.pop(kernel.kernel_id, {})
        waits = [self._ended(kernel, service, None, reason) for service in services.values()]
        self.ports.release_owner(kernel.kernel_id)
        if services:
            waits.append(self._persist(kernel.kernel_id))  # a restart keeps the state dir

        def saved(_: Any) -> None:
            self._saving.pop(kernel.kernel_id, None)

        return _all(waits).addCallback(saved)

    def adopt(self, kernel: Kernel, saved: Any) -> None:
        """
        The take-over's first part: the services the last run saved for ``kernel``, held as
        ``restoring`` with their host ports reserved (before any other kernel can take one).
        """
        held = self._services.setdefault(kernel.kernel_id, {})
        for entry in saved if isinstance(saved, list) else []:
            service = Service.restored(entry)
            if service is None or service.port is None or service.name in held:
                log.warn("kernel {kernel_id}: a saved service is malformed; not restored", kernel_id=kernel.kernel_id)
                continue
            try:
                self.ports.reserve(service.port, kernel.kernel_id)
            except (PortTaken, ValueError) as e:
                log.warn(
                    "kernel {kernel_id}: service {name} cannot have its port {port} again: {error}",
                    kernel_id=kernel.kernel_id,
                    name=service.name,
                    port=service.port,
                    error=str(e),
                )
                service.port = None
            held[service.name] = service

    @inlineCallbacks
    def restore(self, kernel: Kernel) -> Generator[Deferred[Any], Any, None]:
        """
        The take-over's second part, once the runner is reached: each adopted service's relay
        listens on its port again, and the runner is asked which services run (the answer,
        ``services``, ends what ended meanwhile and stops what the agent does not know).
        Fires when the runner answered, or after ``RESTORE_WAIT``.
        """
        if kernel.link is None or not kernel.link.alive:
            return
        reconciled = self._reconciling[kernel.kernel_id] = Deferred()
        restoring = [s for s in self._services.get(kernel.kernel_id, {}).values() if s.status == "restoring"]
        listened = yield DeferredList([self._relisten(kernel, service) for service in restoring], consumeErrors=True)
        for (ok, failure), service in zip(listened, restoring):
            if not ok:
                log.warn(
                    "kernel {kernel_id}: service {name} cannot be relayed again: {error}",
                    kernel_id=kernel.kernel_id,
                    name=service.name,
                    error=failure.getErrorMessage(),
                )
                yield self._ended(kernel, service, None, "lost")
                if kernel.link is not None and kernel.link.alive:
                    kernel.link.send({"type": "stop-service", "name": service.name})
        if kernel.link is None or not kernel.link.alive or reconciled.called:
            self._end_reconciling(kernel.kernel_id)
            return
        kernel.link.send({"type": "list-services", "id": RESTORE_ID})
        timer = self.reactor.callLater(RESTORE_WAIT, self._end_reconciling, kernel.kernel_id)
        yield share(reconciled)
        if timer.active():
            timer.cancel()
        yield self._persist(kernel.kernel_id)

    def handle(self, kernel: Kernel, message: dict[str, Any]) -> None:
        """A message of the kernel's runner about a service."""
        if message.get("type") == "services":
            if message.get("id") == RESTORE_ID:
                self._reconcile(kernel, message.get("services"))
            return
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

    def records(self, kernel_id: str, reveal: bool = True) -> list[dict[str, Any]]:
        """
        The kernel record's ``services``: those started, with their endpoints; with
        ``reveal`` false (the status page) a token in a URL is replaced by ``HIDDEN``.
        """
        return [service.entry(self.host, reveal) for service in self._services.get(kernel_id, {}).values()]

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
        definition = yield self._definition(kernel, service.name)
        service.url_template = definition.url_template
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

    def _relay(self, kernel: Kernel, service: Service) -> ServiceRelay:
        return ServiceRelay(self.reactor, _socket(service.name, self.run_dir(kernel.kernel_id)))

    @inlineCallbacks
    def _relisten(self, kernel: Kernel, service: Service) -> Generator[Deferred[Any], Any, None]:
        """A restored service's relay, on the port its clients have."""
        if service.port is None:
            raise PortTaken("its port is held by another kernel or cooling down")
        relay = self._relay(kernel, service)
        yield relay.listen(self.reactor, self.host, service.port)
        if service.status != "restoring":
            yield relay.stop()
            return
        service.relay, service.status = relay, "running"
        service.url = service.render_url(self.host)
        log.info(
            "kernel {kernel_id}: service {name} restored on {host}:{port}",
            kernel_id=kernel.kernel_id,
            name=service.name,
            host=self.host,
            port=service.port,
        )

    def _reconcile(self, kernel: Kernel, listed: Any) -> None:
        """The runner's answer to the take-over's ``list-services``."""
        if kernel.kernel_id not in self._reconciling:
            return
        running = {
            entry["name"]: entry
            for entry in (listed if isinstance(listed, list) else [])
            if isinstance(entry, dict) and isinstance(entry.get("name"), str)
        }
        held = self._services.get(kernel.kernel_id, {})
        for name, service in list(held.items()):
            entry = running.get(name) or {}
            if service.status in ("running", "restoring") and entry.get("status") != "running":
                self._ended(kernel, service, entry.get("exit_code"), "exited")
        for name, entry in running.items():
            known = held.get(name)
            if entry.get("status") in ("starting", "running") and (known is None or known.status != "running"):
                # Started by a run that died before it relayed it: no client has its token.
                if kernel.link is not None and kernel.link.alive and NAME_PATTERN.match(name):
                    kernel.link.send({"type": "stop-service", "name": name})
        self._end_reconciling(kernel.kernel_id)

    def _end_reconciling(self, kernel_id: str) -> None:
        reconciling = self._reconciling.pop(kernel_id, None)
        if reconciling is not None and not reconciling.called:
            reconciling.callback(None)

    def _persist(self, kernel_id: str) -> Deferred[None]:
        """Save the kernel's running services as they are when the save runs (one at a time)."""
        lock = self._saving.setdefault(kernel_id, DeferredLock())

        def save() -> Deferred[Any]:
            entries = [s.saved() for s in self._services.get(kernel_id, {}).values() if s.status == "running"]
            return self.save(kernel_id, entries)

        def failed(failure: Any) -> None:
            log.failure(
                "kernel {kernel_id}: its services could not be saved; a restart of the agent will not restore them",
                failure,
                kernel_id=kernel_id,
            )

        return lock.run(save).addErrback(failed)

    def _listen(self, kernel: Kernel, service: Service) -> None:
        relay = self._relay(kernel, service)
        d = self.ports.allocate_bound(kernel.kernel_id, lambda port: relay.listen(self.reactor, self.host, port))

        def listening(result: tuple[int, Any]) -> Deferred[None] | None:
            port = result[0]
            if service.status != "starting" or service.token is None:
                relay.stop()  # it failed or was stopped meanwhile
                self.ports.release(port)
                return None
            service.relay, service.port, service.status = relay, port, "running"
            service.url = service.render_url(self.host)
            # Saved before it is answered: a manager never holds an endpoint the next run forgets.
            return self._persist(kernel.kernel_id).addCallback(lambda _: announce(port))

        def announce(port: int) -> None:
            if service.status != "running" or service.port != port:
                service.settle(errors.ServiceStartFailed(f"service {service.name} ended as it started"))
                return
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
        was_running = service.status in ("running", "restoring")  # managers were told it runs
        service.status = "exited"
        if isinstance(exit_code, int) and not isinstance(exit_code, bool):
            service.exit_code = exit_code
        relay, service.relay = service.relay, None
        port, service.port = service.port, None
        service.url = None
        if port is not None:
            self.ports.release(port)
        if was_running:
            self._persist(kernel.kernel_id)
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


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


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
