"""
The declared errors of the wire contract (PROTOCOL.md section 2).

Each error is an exception class with the wire code as ``code``; the AMP commands map
them to their codes, so a responder raises ``KernelNotFound("...")`` and the manager's
``AgentClient`` gets the same class back with the message.
"""


class AgentError(Exception):
    """Base of every declared error; ``str(error)`` is the message sent on the wire."""

    code = b"AGENT_ERROR"


def _error(name, code, doc):
    return type(name, (AgentError,), {"code": code, "__doc__": doc})


InvalidRequest = _error("InvalidRequest", b"INVALID_REQUEST", "A bad argument; the message says which.")
NotAuthenticated = _error("NotAuthenticated", b"NOT_AUTHENTICATED", "Authenticate first.")
BackendUnavailable = _error("BackendUnavailable", b"BACKEND_UNAVAILABLE", "Docker or etcd is unreachable; retry later.")
AuthFailed = _error("AuthFailed", b"AUTH_FAILED", "The MAC does not match the namespace secret.")
KernelNotFound = _error("KernelNotFound", b"KERNEL_NOT_FOUND", "No kernel with that id.")
KernelExists = _error("KernelExists", b"KERNEL_EXISTS", "A kernel with that id exists.")
ImageNotFound = _error("ImageNotFound", b"IMAGE_NOT_FOUND", "No local kernel image of that name.")
InsufficientResources = _error(
    "InsufficientResources", b"INSUFFICIENT_RESOURCES", "The request does not fit the free capacity."
)
KernelCreationFailed = _error("KernelCreationFailed", b"KERNEL_CREATION_FAILED", "The kernel could not be started.")
KernelNotRunning = _error("KernelNotRunning", b"KERNEL_NOT_RUNNING", "The kernel is not running.")
RunConflict = _error("RunConflict", b"RUN_CONFLICT", "Another run is active on the kernel.")
PathNotAllowed = _error("PathNotAllowed", b"PATH_NOT_ALLOWED", "The path leaves /home/work.")
FileTooLarge = _error("FileTooLarge", b"FILE_TOO_LARGE", "The file would exceed the size cap.")
FileNotFound = _error("FileNotFound", b"FILE_NOT_FOUND", "No such file.")
EventsExpired = _error("EventsExpired", b"EVENTS_EXPIRED", "The requested events are older than the journal keeps.")

COMMON_ERRORS = (InvalidRequest, NotAuthenticated, BackendUnavailable)

ALL_ERRORS = (
    COMMON_ERRORS
    + (AuthFailed, KernelNotFound, KernelExists, ImageNotFound, InsufficientResources)
    + (KernelCreationFailed, KernelNotRunning, RunConflict, PathNotAllowed, FileTooLarge)
    + (FileNotFound, EventsExpired)
)

ERRORS_BY_CODE = {error.code: error for error in ALL_ERRORS}
