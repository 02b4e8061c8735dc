"""
The AMP commands of the wire contract (PROTOCOL.md sections 2 and 3).

Every command declares the common errors (``INVALID_REQUEST``, ``NOT_AUTHENTICATED``,
``BACKEND_UNAVAILABLE``) through ``AgentCommand``; command-specific errors are added on top.
"""

from __future__ import annotations

from typing import Final

from twisted.protocols.amp import Command

from bai_agent.protocol import errors as agent_errors
from bai_agent.protocol.arguments import Big, BigJson, BigUnicode, Boolean, Float, Integer, Json, String, Unicode

PROTOCOL_VERSION: Final = 1


def _errors(*extra: type[agent_errors.AgentError]) -> dict[type[Exception], bytes]:
    return {error: error.code for error in agent_errors.COMMON_ERRORS + extra}


class AgentCommand(Command):
    """Base of every command: the common errors are declared once here."""

    errors = _errors()
    requiresAnswer = True


# -- session ----------------------------------------------------------------------------


class Hello(AgentCommand):
    commandName = b"Hello"
    arguments = []
    response = [
        (b"agent_id", Unicode()),
        (b"version", Unicode()),
        (b"protocol", Integer()),
        (b"nonce", String()),
    ]


class Authenticate(AgentCommand):
    commandName = b"Authenticate"
    arguments = [(b"mac", Unicode())]
    response = []
    errors = _errors(agent_errors.AuthFailed)


class Ping(AgentCommand):
    """Sent by either side; the answer carries the same payload."""

    commandName = b"Ping"
    arguments = [(b"payload", Unicode())]
    response = [(b"payload", Unicode())]


# -- agent ------------------------------------------------------------------------------


class GetAgentInfo(AgentCommand):
    commandName = b"GetAgentInfo"
    arguments = []
    response = [(b"info", Json())]


class ListImages(AgentCommand):
    commandName = b"ListImages"
    arguments = []
    response = [(b"images", BigJson())]


class ListKernels(AgentCommand):
    commandName = b"ListKernels"
    arguments = []
    response = [(b"kernels", BigJson())]


class Subscribe(AgentCommand):
    commandName = b"Subscribe"
    arguments = [(b"since", Integer())]
    response = [(b"last_seq", Integer())]
    errors = _errors(agent_errors.EventsExpired)


class Reset(AgentCommand):
    commandName = b"Reset"
    arguments = []
    response = [(b"destroyed", Integer())]


# -- kernels ----------------------------------------------------------------------------


class CreateKernel(AgentCommand):
    commandName = b"CreateKernel"
    arguments = [
        (b"kernel_id", Unicode()),
        (b"image", Unicode()),
        (b"resources", Json()),
        (b"environ", Json(optional=True)),
        (b"mounts", Json(optional=True)),
        (b"idle_timeout", Integer(optional=True)),
        (b"exec_timeout", Integer(optional=True)),
        (b"image_pull", Unicode(optional=True)),
        (b"registry_auth", Json(optional=True)),
    ]
    response = [(b"kernel", Json())]
    errors = _errors(
        agent_errors.KernelExists,
        agent_errors.ImageNotFound,
        agent_errors.InsufficientResources,
        agent_errors.KernelCreationFailed,
        agent_errors.RegistryAuthFailed,
        agent_errors.ImagePullFailed,
    )


class PullImage(AgentCommand):
    commandName = b"PullImage"
    arguments = [(b"image", Unicode()), (b"registry_auth", Json(optional=True))]
    response = [(b"image", Json())]
    errors = _errors(agent_errors.ImageNotFound, agent_errors.RegistryAuthFailed, agent_errors.ImagePullFailed)


class RemoveImage(AgentCommand):
    commandName = b"RemoveImage"
    arguments = [(b"image", Unicode())]
    response = []
    errors = _errors(agent_errors.ImageNotFound, agent_errors.ImageInUse)


class DestroyKernel(AgentCommand):
    commandName = b"DestroyKernel"
    arguments = [(b"kernel_id", Unicode()), (b"reason", Unicode(optional=True))]
    response = [
        (b"kernel_id", Unicode()),
        (b"exit_code", Integer(optional=True)),
        (b"stats", Json()),
    ]
    errors = _errors(agent_errors.KernelNotFound)


class RestartKernel(AgentCommand):
    commandName = b"RestartKernel"
    arguments = [(b"kernel_id", Unicode())]
    response = [(b"kernel", Json())]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.KernelCreationFailed)


class InterruptKernel(AgentCommand):
    commandName = b"InterruptKernel"
    arguments = [(b"kernel_id", Unicode())]
    response = []
    errors = _errors(agent_errors.KernelNotFound, agent_errors.KernelNotRunning)


class Execute(AgentCommand):
    commandName = b"Execute"
    arguments = [
        (b"kernel_id", Unicode()),
        (b"run_id", Unicode(optional=True)),
        (b"mode", Unicode()),
        (b"code", BigUnicode()),
        (b"options", Json(optional=True)),
    ]
    response = [
        (b"run_id", Unicode()),
        (b"status", Unicode()),
        (b"exit_code", Integer(optional=True)),
        (b"console", BigJson()),
        (b"options", Json(optional=True)),
    ]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.KernelNotRunning, agent_errors.RunConflict)


class GetCompletions(AgentCommand):
    commandName = b"GetCompletions"
    arguments = [
        (b"kernel_id", Unicode()),
        (b"text", Unicode()),
        (b"options", Json(optional=True)),
    ]
    response = [(b"completions", Json())]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.KernelNotRunning)


class UploadFile(AgentCommand):
    commandName = b"UploadFile"
    arguments = [
        (b"kernel_id", Unicode()),
        (b"path", Unicode()),
        (b"data", Big()),
        (b"append", Boolean()),
    ]
    response = [(b"size", Integer())]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.PathNotAllowed, agent_errors.FileTooLarge)


class DownloadFile(AgentCommand):
    commandName = b"DownloadFile"
    arguments = [
        (b"kernel_id", Unicode()),
        (b"path", Unicode()),
        (b"offset", Integer()),
        (b"length", Integer()),
    ]
    response = [(b"data", Big()), (b"size", Integer()), (b"eof", Boolean())]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.PathNotAllowed, agent_errors.FileNotFound)


class ListFiles(AgentCommand):
    commandName = b"ListFiles"
    arguments = [(b"kernel_id", Unicode()), (b"path", Unicode(optional=True))]
    response = [(b"files", BigJson())]
    errors = _errors(agent_errors.KernelNotFound, agent_errors.PathNotAllowed, agent_errors.FileNotFound)


class GetKernelStats(AgentCommand):
    commandName = b"GetKernelStats"
    arguments = [(b"kernel_id", Unicode())]
    response = [(b"stats", Json())]
    errors = _errors(agent_errors.KernelNotFound)


class GetLogs(AgentCommand):
    commandName = b"GetLogs"
    arguments = [(b"kernel_id", Unicode()), (b"tail", Integer(optional=True))]
    response = [(b"logs", BigUnicode())]
    errors = _errors(agent_errors.KernelNotFound)


# -- services (section 7) -----------------------------------------------------------------


class StartService(AgentCommand):
    commandName = b"StartService"
    arguments = [(b"kernel_id", Unicode()), (b"service", Unicode()), (b"options", Json(optional=True))]
    response = [
        (b"service", Unicode()),
        (b"protocol", Unicode()),
        (b"host", Unicode()),
        (b"port", Integer()),
        (b"url", Unicode(optional=True)),
    ]
    errors = _errors(
        agent_errors.KernelNotFound,
        agent_errors.KernelNotRunning,
        agent_errors.ServiceNotFound,
        agent_errors.ServiceStartFailed,
    )


class StopService(AgentCommand):
    commandName = b"StopService"
    arguments = [(b"kernel_id", Unicode()), (b"service", Unicode())]
    response = []
    errors = _errors(agent_errors.KernelNotFound, agent_errors.ServiceNotFound)


class ListServices(AgentCommand):
    commandName = b"ListServices"
    arguments = [(b"kernel_id", Unicode())]
    response = [(b"services", BigJson())]
    errors = _errors(agent_errors.KernelNotFound)


# -- agent -> manager -------------------------------------------------------------------


class Event(Command):
    """An event pushed to a subscribed manager; the empty answer acknowledges it."""

    commandName = b"Event"
    arguments = [
        (b"seq", Integer()),
        (b"type", Unicode()),
        (b"kernel_id", Unicode(optional=True)),
        (b"data", Json()),
        (b"ts", Float()),
    ]
    response = []
    requiresAnswer = True


MANAGER_TO_AGENT: tuple[type[AgentCommand], ...] = (
    Hello,
    Authenticate,
    Ping,
    GetAgentInfo,
    ListImages,
    ListKernels,
    CreateKernel,
    PullImage,
    RemoveImage,
    DestroyKernel,
    RestartKernel,
    InterruptKernel,
    Execute,
    GetCompletions,
    UploadFile,
    DownloadFile,
    ListFiles,
    GetKernelStats,
    GetLogs,
    StartService,
    StopService,
    ListServices,
    Subscribe,
    Reset,
)

AGENT_TO_MANAGER: tuple[type[Command], ...] = (Ping, Event)

UNAUTHENTICATED_COMMANDS: frozenset[bytes] = frozenset({Hello.commandName, Authenticate.commandName})

COMMANDS_BY_NAME: dict[bytes, type[AgentCommand]] = {command.commandName: command for command in MANAGER_TO_AGENT}
