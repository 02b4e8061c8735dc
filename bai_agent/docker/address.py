"""
Where the Docker daemon listens: ``DOCKER_HOST`` (``unix:///path.sock`` or
``tcp://host:port``) parsed once into a ``DockerAddress``, which makes the endpoint the
client connects with and the URL prefix its requests carry.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint


@attrs.frozen
class DockerAddress:
    """A parsed ``DOCKER_HOST``: ``unix`` with ``path``, or ``tcp`` with ``host`` and ``port``."""

    scheme: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def endpoint(self, reactor: object, timeout: float) -> IStreamClientEndpoint:
        """The endpoint that connects to the daemon, with a connection ``timeout``."""
        if self.scheme == "unix":
            assert self.path is not None
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None and self.port is not None
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)

    @property
    def base_url(self) -> str:
        """The URL prefix requests use; for UNIX sockets the host part is a placeholder."""
        if self.scheme == "unix":
            return "http://docker"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_docker_host(docker_host: str) -> DockerAddress:
    """
    Parse ``unix:///abs/path.sock`` or ``tcp://host:port`` into a ``DockerAddress``.
    Anything else raises ``ValueError`` naming the value.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid docker host {docker_host!r}: {why}")

    if not isinstance(docker_host, str) or not docker_host:
        raise bad("expected unix:///path/to.sock or tcp://host:port")
    if docker_host.startswith("unix://"):
        path = docker_host[len("unix://") :]
        if not path.startswith("/"):
            raise bad("the socket path must be absolute (unix:///path/to.sock)")
        if "\0" in path:
            raise bad("the socket path contains a NUL byte")
        return DockerAddress(scheme="unix", path=path)
    if docker_host.startswith("tcp://"):
        parts = urlsplit(docker_host)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise bad("expected tcp://host:port with nothing after the port")
        try:
            port = parts.port
        except ValueError as e:
            raise bad("the port must be a number from 1 to 65535") from e
        if not parts.hostname:
            raise bad("no host")
        if port is None or port == 0:
            raise bad("expected tcp://host:port with a port from 1 to 65535")
        return DockerAddress(scheme="tcp", host=parts.hostname, port=port)
    raise bad("expected unix:///path/to.sock or tcp://host:port")
