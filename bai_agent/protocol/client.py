"""
``AgentClient``: the manager's side of the wire contract.

    client = yield AgentClient.connect(reactor, "10.0.0.5:6001", secret)
    info = yield client.get_agent_info()

Declared errors come back as the classes of ``bai_agent.protocol.errors``.
"""

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, connectProtocol
from twisted.logger import Logger
from twisted.protocols import amp

from bai_agent.protocol import commands
from bai_agent.protocol.auth import compute_mac


def client_endpoint(reactor, address: str):
    """
    A client endpoint for an agent address: ``host:port`` as agents advertise it in
    etcd (``[v6addr]:port`` for IPv6), or any Twisted client endpoint string
    (``tcp:host=...:port=...``, ``unix:path=...``).
    """
    if address.startswith(("tcp:", "unix:", "ssl:", "tls:", "tcp6:", "ssh:")):
        return clientFromString(reactor, address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"agent address must be HOST:PORT, got {address!r}")
    host = host.strip("[]")
    return HostnameEndpoint(reactor, host, int(port))


class ManagerLocator(amp.CommandLocator):
    """Answers what an agent sends a manager: ``Ping`` and ``Event``."""

    log = Logger()

    def __init__(self, on_event=None):
        self.on_event = on_event

    @commands.Ping.responder
    def ping(self, payload):
        return {"payload": payload}

    @commands.Event.responder
    def event(self, seq, type, data, ts, kernel_id=None):
        # The answer is the acknowledgement: it goes out only once the callback is done,
        # so a manager that fails to record the event gets it again after a reconnect.
        event = {"seq": seq, "type": type, "kernel_id": kernel_id, "data": data, "ts": ts}
        if self.on_event is None:
            return {}
        return maybeDeferred(self.on_event, event).addCallback(lambda _: {})


class ManagerAMP(amp.AMP):
    """The manager's end of a connection; ``lost`` fires when it closes."""

    def __init__(self, locator):
        super().__init__(locator=locator)
        self.lost = Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


class AgentClient:
    """Typed calls to one agent over one authenticated AMP connection."""

    def __init__(self, protocol: amp.AMP):
        self.protocol = protocol
        self.agent_id = None
        self.agent_version = None

    @classmethod
    @inlineCallbacks
    def connect(cls, reactor, address, secret, on_event=None, timeout=10.0):
        """Connect to ``address``, say ``Hello`` and authenticate with ``secret``."""
        endpoint = address if not isinstance(address, str) else client_endpoint(reactor, address)
        protocol = ManagerAMP(ManagerLocator(on_event))
        d = connectProtocol(endpoint, protocol)
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
    def disconnected(self):
        """A Deferred that fires when the connection closes."""
        return self.protocol.lost

    def set_event_handler(self, on_event):
        """Handle ``Event`` pushes with ``on_event(event_dict)`` (may return a Deferred)."""
        self.protocol.locator.on_event = on_event

    def _call(self, command, **kwargs):
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        return self.protocol.callRemote(command, **kwargs)

    def close(self):
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    @inlineCallbacks
    def hello(self):
        answer = yield self._call(commands.Hello)
        self.agent_id = answer["agent_id"]
        self.agent_version = answer["version"]
        return answer

    def authenticate(self, secret: str, nonce: bytes):
        return self._call(commands.Authenticate, mac=compute_mac(secret, nonce))

    @inlineCallbacks
    def ping(self, payload=""):
        answer = yield self._call(commands.Ping, payload=payload)
        return answer["payload"]

    @inlineCallbacks
    def get_agent_info(self):
        answer = yield self._call(commands.GetAgentInfo)
        return answer["info"]

    @inlineCallbacks
    def list_images(self):
        answer = yield self._call(commands.ListImages)
        return answer["images"]

    @inlineCallbacks
    def list_kernels(self):
        answer = yield self._call(commands.ListKernels)
        return answer["kernels"]

    @inlineCallbacks
    def create_kernel(
        self, kernel_id, image, resources, environ=None, mounts=None, idle_timeout=None, exec_timeout=None
    ):
        answer = yield self._call(
            commands.CreateKernel,
            kernel_id=kernel_id,
            image=image,
            resources=resources,
            environ=environ,
            mounts=mounts,
            idle_timeout=idle_timeout,
            exec_timeout=exec_timeout,
        )
        return answer["kernel"]

    def destroy_kernel(self, kernel_id, reason=None):
        return self._call(commands.DestroyKernel, kernel_id=kernel_id, reason=reason)

    @inlineCallbacks
    def restart_kernel(self, kernel_id):
        answer = yield self._call(commands.RestartKernel, kernel_id=kernel_id)
        return answer["kernel"]

    def interrupt_kernel(self, kernel_id):
        return self._call(commands.InterruptKernel, kernel_id=kernel_id)

    def execute(self, kernel_id, mode, code="", run_id=None, options=None):
        return self._call(commands.Execute, kernel_id=kernel_id, mode=mode, code=code, run_id=run_id, options=options)

    @inlineCallbacks
    def get_completions(self, kernel_id, text, options=None):
        answer = yield self._call(commands.GetCompletions, kernel_id=kernel_id, text=text, options=options)
        return answer["completions"]

    def upload_file(self, kernel_id, path, data, append=False):
        return self._call(commands.UploadFile, kernel_id=kernel_id, path=path, data=data, append=append)

    def download_file(self, kernel_id, path, offset=0, length=1 << 20):
        return self._call(commands.DownloadFile, kernel_id=kernel_id, path=path, offset=offset, length=length)

    @inlineCallbacks
    def list_files(self, kernel_id, path=None):
        answer = yield self._call(commands.ListFiles, kernel_id=kernel_id, path=path)
        return answer["files"]

    @inlineCallbacks
    def get_kernel_stats(self, kernel_id):
        answer = yield self._call(commands.GetKernelStats, kernel_id=kernel_id)
        return answer["stats"]

    @inlineCallbacks
    def get_logs(self, kernel_id, tail=None):
        answer = yield self._call(commands.GetLogs, kernel_id=kernel_id, tail=tail)
        return answer["logs"]

    @inlineCallbacks
    def subscribe(self, since=0):
        answer = yield self._call(commands.Subscribe, since=since)
        return answer["last_seq"]

    @inlineCallbacks
    def reset(self):
        answer = yield self._call(commands.Reset)
        return answer["destroyed"]
