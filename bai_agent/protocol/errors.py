"""
The declared errors of the wire contract (PROTOCOL.md section 2).

Each error is an exception class with the wire code as ``code``; the AMP commands map
them to their codes, so a responder raises ``KernelNotFound("...")`` and the manager's
``AgentClient`` gets the same class back with the message.
"""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    """Base of every declared error; ``str(error)`` is the message sent on the wire."""

    code: ClassVar[bytes] = b"AGENT_ERROR"


class InvalidRequest(AgentError):
    """A bad argument; the message says which."""

    code = b"INVALID_REQUEST"


class NotAuthenticated(AgentError):
    """Authenticate first."""

    code = b"NOT_AUTHENTICATED"


class BackendUnavailable(AgentError):
    """Docker or etcd is unreachable; retry later."""

    code = b"BACKEND_UNAVAILABLE"


class AuthFailed(AgentError):
    """The MAC does not match the namespace secret."""

    code = b"AUTH_FAILED"


class KernelNotFound(AgentError):
    """No kernel with that id."""

    code = b"KERNEL_NOT_FOUND"


class KernelExists(AgentError):
    """A kernel with that id exists."""

    code = b"KERNEL_EXISTS"


class ImageNotFound(AgentError):
    """No local kernel image of that name."""

    code = b"IMAGE_NOT_FOUND"


class InsufficientResources(AgentError):
    """The request does not fit the free capacity."""

    code = b"INSUFFICIENT_RESOURCES"


class KernelCreationFailed(AgentError):
    """The kernel could not be started."""

    code = b"KERNEL_CREATION_FAILED"


class KernelNotRunning(AgentError):
    """The kernel is not running."""

    code = b"KERNEL_NOT_RUNNING"


class RunConflict(AgentError):
    """Another run is active on the kernel."""

    code = b"RUN_CONFLICT"


class PathNotAllowed(AgentError):
    """The path leaves /home/work."""

    code = b"PATH_NOT_ALLOWED"


class FileTooLarge(AgentError):
    """The file would exceed the size cap."""

    code = b"FILE_TOO_LARGE"


class FileNotFound(AgentError):
    """No such file."""

    code = b"FILE_NOT_FOUND"


class EventsExpired(AgentError):
    """The requested events are older than the journal keeps."""

    code = b"EVENTS_EXPIRED"


class ServiceNotFound(AgentError):
    """The kernel's image declares no such service (``StartService``), or it was never started (``StopService``)."""

    code = b"SERVICE_NOT_FOUND"


class ServiceStartFailed(AgentError):
    """The service exited, or did not listen in time; the message ends with the tail of its output."""

    code = b"SERVICE_START_FAILED"


class RegistryAuthFailed(AgentError):
    """The registry refused the credentials, or asked for credentials none were given for."""

    code = b"REGISTRY_AUTH_FAILED"


class ImagePullFailed(AgentError):
    """A pull failed otherwise (unreachable registry, broken download, timeout); the registry's message is in it."""

    code = b"IMAGE_PULL_FAILED"


class ImageInUse(AgentError):
    """``RemoveImage`` of an image a kernel runs (or the warm pool keeps)."""

    code = b"IMAGE_IN_USE"


COMMON_ERRORS: tuple[type[AgentError], ...] = (InvalidRequest, NotAuthenticated, BackendUnavailable)

ALL_ERRORS: tuple[type[AgentError], ...] = (
    COMMON_ERRORS
    + (AuthFailed, KernelNotFound, KernelExists, ImageNotFound, InsufficientResources)
    + (KernelCreationFailed, KernelNotRunning, RunConflict, PathNotAllowed, FileTooLarge)
    + (FileNotFound, EventsExpired, ServiceNotFound, ServiceStartFailed)
    + (RegistryAuthFailed, ImagePullFailed, ImageInUse)
)

ERRORS_BY_CODE: dict[bytes, type[AgentError]] = {error.code: error for error in ALL_ERRORS}
