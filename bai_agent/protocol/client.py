"""
``AgentClient``: the manager's side of the wire contract.

    client = yield AgentClient.connect(reactor, "10.0.0.5:6001", secret)
    info = yield client.get_agent_info()

Declared errors come back as the classes of ``bai_agent.protocol.errors``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from bai_agent.protocol import commands
from bai_agent.protocol.auth import compute_mac

_T = TypeVar("_T")

#: An AMP answer (or an event), keyed by the Python names of the command's response.
Answer = dict[str, Any]
#: What ``inlineCallbacks`` methods are: they yield Deferreds and return ``_T``.
_Calls = Generator["Deferred[Any]", Any, _T]
#: Handles one ``Event`` push (a dict of seq, type, kernel_id, data, ts); may return a Deferred.
EventHandler = Callable[[Answer], object]


# ``reactor`` is any reactor that can connect (TCP, UNIX, name resolution, time), which
# Twisted's endpoints type as Any too.
def client_endpoint(reactor: Any, address: str) -> IStreamClientEndpoint:
    """
    A client endpoint for an agent address: ``host:port`` as agents advertise it in
    etcd (``[v6addr]:port`` for IPv6), or any Twisted client endpoint string
    (``tcp:host=...:port=...``, ``unix:path=...``).
    """
    if address.startswith(("tcp:", "unix:", "ssl:", "tls:", "tcp6:", "ssh:")):
        endpoint: IStreamClientEndpoint = clientFromString(reactor, address)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        return endpoint
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"agent address must be HOST:PORT, got {address!r}")
    host = host.strip("[]")
    return HostnameEndpoint(reactor, host, int(port))


class ManagerLocator(amp.CommandLocator):
    """Answers what an agent sends a manager: ``Ping`` and ``Event``."""

    log = Logger()

    def __init__(self, on_event: EventHandler | None = None) -> None:
        self.on_event = on_event

    @commands.Ping.responder
    def ping(self, payload: str) -> Answer:
        return {"payload": payload}

    @commands.Event.responder
    def event(
        self, seq: int, type: str, data: Any, ts: float, kernel_id: str | None = None
    ) -> Answer | Deferred[Answer]:
        # The answer is the acknowledgement: it goes out only once the callback is done,
        # so a manager that fails to record the event gets it again after a reconnect.
        event = {"seq": seq, "type": type, "kernel_id": kernel_id, "data": data, "ts": ts}
        if self.on_event is None:
            return {}
        return maybeDeferred(self.on_event, event).addCallback(lambda _: {})


class ManagerAMP(amp.AMP):
    """The manager's end of a connection; ``lost`` fires when it closes."""

    def __init__(self, locator: ManagerLocator) -> None:
        super().__init__(locator=locator)  # type: ignore[no-untyped-call]  # amp.AMP is unannotated
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # amp.AMP is unannotated
        if not self.lost.called:
            self.lost.callback(None)


class AgentClient:
    """Typed calls to one agent over one authenticated AMP connection."""

    # ``protocol`` is what ``connect`` makes, a ManagerAMP; tests may pass a plain AMP
    # (with a ManagerLocator) and use neither ``disconnected`` nor ``set_event_handler``.
    def __init__(self, protocol: amp.AMP) -> None:
        self.protocol = protocol
        self.agent_id: str | None = None
        self.agent_version: str | None = None

    @classmethod
    @inlineCallbacks
    def connect(
        cls,
        reactor: Any,
        address: str | IStreamClientEndpoint,
        secret: str,
        on_event: EventHandler | None = None,
        timeout: float = 10.0,
    ) -> _Calls[AgentClient]:
        """Connect to ``address``, say ``Hello`` and authenticate with ``secret``."""
        endpoint = address if not isinstance(address, str) else client_endpoint(reactor, address)
        protocol = ManagerAMP(ManagerLocator(on_event))
        d: Deferred[ManagerAMP] = connectProtocol(endpoint, protocol)  # type: ignore[no-untyped-call]  # unannotated
        d.addTimeout(timeout, reactor)
        yield d
        client = cls(protocol)
        try:
            hello = yield client.hello()
            yield client.authenticate(secret, hello["nonce"])
        except BaseException:
            client.close()
            raise
        return client

    @property
    def disconnected(self) -> Deferred[None]:
        """A Deferred that fires when the connection closes."""
        return cast(ManagerAMP, self.protocol).lost

    def set_event_handler(self, on_event: EventHandler | None) -> None:
        """Handle ``Event`` pushes with ``on_event(event_dict)`` (may return a Deferred)."""
        self.protocol.locator.on_event = on_event

    def _call(self, command: type[amp.Command], **kwargs: Any) -> Deferred[Answer]:
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        answer: Deferred[Answer] = self.protocol.callRemote(command, **kwargs)  # type: ignore[no-untyped-call]  # unannotated
        return answer

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    @inlineCallbacks
    def hello(self) -> _Calls[Answer]:
        answer: Answer = yield self._call(commands.Hello)
        self.agent_id = answer["agent_id"]
        self.agent_version = answer["version"]
        return answer

    def authenticate(self, secret: str, nonce: bytes) -> Deferred[Answer]:
        return self._call(commands.Authenticate, mac=compute_mac(secret, nonce))

    @inlineCallbacks
    def ping(self, payload: str = "") -> _Calls[str]:
        answer = yield self._call(commands.Ping, payload=payload)
        echoed: str = answer["payload"]
        return echoed

    @inlineCallbacks
    def get_agent_info(self) -> _Calls[Any]:
        answer = yield self._call(commands.GetAgentInfo)
        return answer["info"]

    @inlineCallbacks
    def list_images(self) -> _Calls[Any]:
        answer = yield self._call(commands.ListImages)
        return answer["images"]

    @inlineCallbacks
    def list_kernels(self) -> _Calls[Any]:
        answer = yield self._call(commands.ListKernels)
        return answer["kernels"]

    @inlineCallbacks
    def create_kernel(
        self,
        kernel_id: str,
        image: str,
        resources: Any,
        environ: Any = None,
        mounts: Any = None,
        idle_timeout: int | None = None,
        exec_timeout: int | None = None,
        image_pull: str | None = None,
        registry_auth: Any = None,
    ) -> _Calls[Any]:
        answer = yield self._call(
            commands.CreateKernel,
            kernel_id=kernel_id,
            image=image,
            resources=resources,
            environ=environ,
            mounts=mounts,
            idle_timeout=idle_timeout,
            exec_timeout=exec_timeout,
            image_pull=image_pull,
            registry_auth=registry_auth,
        )
        return answer["kernel"]

    @inlineCallbacks
    def pull_image(self, image: str, registry_auth: Any = None) -> _Calls[Any]:
        """Pull ``image`` (a reference); its ``ListImages`` entry."""
        answer = yield self._call(commands.PullImage, image=image, registry_auth=registry_auth)
        return answer["image"]

    def remove_image(self, image: str) -> Deferred[Answer]:
        return self._call(commands.RemoveImage, image=image)

    def destroy_kernel(self, kernel_id: str, reason: str | None = None) -> Deferred[Answer]:
        return self._call(commands.DestroyKernel, kernel_id=kernel_id, reason=reason)

    @inlineCallbacks
    def restart_kernel(self, kernel_id: str) -> _Calls[Any]:
        answer = yield self._call(commands.RestartKernel, kernel_id=kernel_id)
        return answer["kernel"]

    def interrupt_kernel(self, kernel_id: str) -> Deferred[Answer]:
        return self._call(commands.InterruptKernel, kernel_id=kernel_id)

    def execute(
        self, kernel_id: str, mode: str, code: str = "", run_id: str | None = None, options: Any = None
    ) -> Deferred[Answer]:
        return self._call(commands.Execute, kernel_id=kernel_id, mode=mode, code=code, run_id=run_id, options=options)

    @inlineCallbacks
    def get_completions(self, kernel_id: str, text: str, options: Any = None) -> _Calls[Any]:
        answer = yield self._call(commands.GetCompletions, kernel_id=kernel_id, text=text, options=options)
        return answer["completions"]

    def upload_file(self, kernel_id: str, path: str, data: bytes, append: bool = False) -> Deferred[Answer]:
        return self._call(commands.UploadFile, kernel_id=kernel_id, path=path, data=data, append=append)

    def download_file(self, kernel_id: str, path: str, offset: int = 0, length: int = 1 << 20) -> Deferred[Answer]:
        return self._call(commands.DownloadFile, kernel_id=kernel_id, path=path, offset=offset, length=length)

    @inlineCallbacks
    def list_files(self, kernel_id: str, path: str | None = None) -> _Calls[Any]:
        answer = yield self._call(commands.ListFiles, kernel_id=kernel_id, path=path)
        return answer["files"]

    @inlineCallbacks
    def get_kernel_stats(self, kernel_id: str) -> _Calls[Any]:
        answer = yield self._call(commands.GetKernelStats, kernel_id=kernel_id)
        return answer["stats"]

    @inlineCallbacks
    def get_logs(self, kernel_id: str, tail: int | None = None) -> _Calls[str]:
        answer = yield self._call(commands.GetLogs, kernel_id=kernel_id, tail=tail)
        logs: str = answer["logs"]
        return logs

    def start_service(self, kernel_id: str, service: str, options: dict[str, Any] | None = None) -> Deferred[Any]:
        """Fires with ``{service, protocol, host, port, [url]}`` (section 7)."""
        return self._call(commands.StartService, kernel_id=kernel_id, service=service, options=options)

    @inlineCallbacks
    def stop_service(self, kernel_id: str, service: str) -> _Calls[None]:
        yield self._call(commands.StopService, kernel_id=kernel_id, service=service)

    @inlineCallbacks
    def list_services(self, kernel_id: str) -> _Calls[list[dict[str, Any]]]:
        answer = yield self._call(commands.ListServices, kernel_id=kernel_id)
        services: list[dict[str, Any]] = answer["services"]
        return services

    @inlineCallbacks
    def subscribe(self, since: int = 0) -> _Calls[int]:
        answer = yield self._call(commands.Subscribe, since=since)
        last_seq: int = answer["last_seq"]
        return last_seq

    @inlineCallbacks
    def reset(self) -> _Calls[int]:
        answer = yield self._call(commands.Reset)
        destroyed: int = answer["destroyed"]
        return destroyed
