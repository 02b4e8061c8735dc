"""
Blocking helpers for tests that need the real Docker daemon: find it, make and remove
tiny local images (nothing can be pulled here), find the kernel image, and remove the
containers tests made. Standard library only; these block, so they belong in fixtures
and test set-up, never in the daemon.
"""

import http.client
import io
import json
import os
import socket
import tarfile
import tempfile
from urllib.parse import quote, urlencode

from bai_agent.docker.engine import image_path, parse_docker_host

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

#: The kernel image ``scripts/build-kernel-image`` makes (``BAI_KERNEL_IMAGE`` overrides).
DEFAULT_KERNEL_IMAGE = "bai-kernel/python:3.11"


class DockerHTTPError(Exception):
    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_host_from_env(environ=None):
    """``DOCKER_HOST`` from the environment, or the default UNIX socket."""
    environ = os.environ if environ is None else environ
    return environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def docker_request(docker_host, method, path, body=None, headers=None, timeout=60.0):
    """
    One blocking request to the daemon; return ``(status, body bytes)``. Raise
    ``OSError`` when the daemon cannot be reached.
    """
    address = parse_docker_host(docker_host)
    connection: http.client.HTTPConnection
    if address.scheme == "unix":
        connection = _UnixHTTPConnection(address.path, timeout)
    else:
        assert address.host is not None, address
        connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _checked(docker_host, method, path, body=None, headers=None):
    status, data = docker_request(docker_host, method, path, body, headers)
    if not 200 <= status < 300:
        try:
            message = json.loads(data).get("message") or data.decode("utf-8", "replace")
        except (ValueError, AttributeError):
            message = data.decode("utf-8", "replace")
        raise DockerHTTPError(status, message)
    return data


def require_docker():
    """
    The ``DOCKER_HOST`` of a running daemon, checked with ``GET /_ping``; fail the
    test (never skip it) with how to start one when it does not answer.
    """
    import pytest

    docker_host = docker_host_from_env()
    try:
        status, body = docker_request(docker_host, "GET", "/_ping", timeout=5.0)
        if status != 200:
            raise OSError(f"/_ping answered HTTP {status}: {body[:200]!r}")
    except (OSError, ValueError, http.client.HTTPException) as e:
        pytest.fail(
            f"These tests need a running Docker daemon at {docker_host} (DOCKER_HOST), "
            f"and it does not answer: {e}.\n"
            "Start one in the background, without a default bridge network, with:\n"
            "    dockerd --bridge=none &\n"
            "then wait until `docker info` answers, or set DOCKER_HOST to a running daemon.",
            pytrace=False,
        )
    return docker_host


def require_kernel_image(docker_host, environ=None):
    """
    The name of the local kernel image (``BAI_KERNEL_IMAGE`` or the default), checked
    with ``GET /images/{name}/json``; fail the test (never skip it) with how to build it
    when it is missing.
    """
    import pytest

    environ = os.environ if environ is None else environ
    name = environ.get("BAI_KERNEL_IMAGE") or DEFAULT_KERNEL_IMAGE
    status, body = docker_request(docker_host, "GET", image_path(name, "/json"), timeout=10.0)
    if status != 200:
        pytest.fail(
            f"These tests run containers of the kernel image {name} (BAI_KERNEL_IMAGE), "
            f"and the daemon at {docker_host} does not have it (HTTP {status}).\n"
            "Build it locally, without a registry, with:\n"
            "    scripts/build-kernel-image",
            pytrace=False,
        )
    return name


def remove_container(container_id, docker_host=None):
    """
    ``docker rm --force --volumes container_id`` (an id or a name). Return False when
    there was no such container.
    """
    docker_host = docker_host or docker_host_from_env()
    path = "/containers/" + quote(container_id, safe="") + "?force=1&v=1"
    try:
        _checked(docker_host, "DELETE", path)
    except DockerHTTPError as e:
        if e.status == 404:
            return False
        if e.status == 409 and "already in progress" in e.message:
            return True
        raise
    return True


def _tiny_rootfs_tar(directory):
    path = os.path.join(directory, "rootfs.tar")
    content = b"bai-agent test image\n"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("README")
        info.size = len(content)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    return path


def _split_name(name):
    """``repo:tag`` -> ``(repo, tag)``; no tag means ``latest``."""
    if ":" in name.rsplit("/", 1)[-1]:
        repo, _, tag = name.rpartition(":")
        return repo, tag
    return name, "latest"


def import_test_image(name, labels, docker_host=None):
    """
    Create the local image ``name`` (``repo:tag``) from a one-file tar with ``labels``
    (``docker import --change 'LABEL ...'``); return its id.
    """
    docker_host = docker_host or docker_host_from_env()
    repo, tag = _split_name(name)
    query = [("fromSrc", "-"), ("repo", repo), ("tag", tag)]
    query += [("changes", f"LABEL {key}={json.dumps(value)}") for key, value in labels.items()]
    with tempfile.TemporaryDirectory(prefix="bai-image-") as directory:
        with open(_tiny_rootfs_tar(directory), "rb") as tar:
            body = tar.read()
    progress = _checked(
        docker_host,
        "POST",
        "/images/create?" + urlencode(query),
        body=body,
        headers={"Content-Type": "application/x-tar"},
    )
    for line in progress.splitlines():
        if line.strip():
            message = json.loads(line)
            if "error" in message:
                raise DockerHTTPError(500, message["error"])
    return json.loads(_checked(docker_host, "GET", image_path(name, "/json")))["Id"]


def tag_image(source, target, docker_host=None):
    """``docker tag source target``."""
    docker_host = docker_host or docker_host_from_env()
    repo, tag = _split_name(target)
    _checked(docker_host, "POST", image_path(source, "/tag?") + urlencode({"repo": repo, "tag": tag}))


def remove_image(name, force=False, docker_host=None):
    """
    ``docker rmi name``: untag (and delete once untagged). Return False when there
    was no such image.
    """
    docker_host = docker_host or docker_host_from_env()
    try:
        _checked(docker_host, "DELETE", image_path(name) + ("?force=1" if force else ""))
    except DockerHTTPError as e:
        if e.status == 404:
            return False
        raise
    return True


__all__ = [
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_KERNEL_IMAGE",
    "DockerHTTPError",
    "docker_host_from_env",
    "docker_request",
    "import_test_image",
    "remove_container",
    "remove_image",
    "require_docker",
    "require_kernel_image",
    "tag_image",
]
