"""
What an image declares about its services, as validated values (docs/protocol.md section 7).

The ``ai.backend.service-ports`` label (``name:protocol:port,...``) becomes ``ServicePort``
values; a service definition file (``/etc/backend.ai/service-defs/{name}.json``) becomes a
``ServiceDefinition``. Both come from the image, which a user may have built: every field is
checked, every size bounded, and only the placeholders ``{host}``, ``{port}``, ``{token}``
and ``{home}`` are substituted (no attribute or index lookups, no format specs), so a
definition can never reach anything but the four values it is given.
"""

import json
import re
import string
from collections.abc import Mapping
from typing import Any, Optional, Union

import attrs
from twisted.logger import Logger

from bai_agent.protocol.labels import SERVICE_PORTS_LABEL

__all__ = [
    "MAX_ARGV_ITEMS",
    "MAX_DEFINITION_BYTES",
    "MAX_ENV_ITEMS",
    "PLACEHOLDERS",
    "PROTOCOLS",
    "ServiceDeclarationError",
    "ServiceDefinition",
    "ServicePort",
    "declared_services",
    "parse_service_definition",
    "parse_service_ports",
    "render",
    "url",
]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}\Z")
PROTOCOLS = ("http", "tcp")
MIN_PORT = 1025
MAX_PORT = 65535
MAX_DEFINITION_BYTES = 64 * 1024
MAX_ARGV_ITEMS = 256
MAX_ENV_ITEMS = 256
PLACEHOLDERS = frozenset({"host", "port", "token", "home"})
# Where a service listens, as seen by its own command: the container's loopback (the relay
# reaches it there through the kernel's UNIX socket).
CONTAINER_HOST = "127.0.0.1"
DEFAULT_HOME = "/home/work"
MAX_LABEL_LENGTH = 4096


class ServiceDeclarationError(ValueError):
    """An image's service label or definition is malformed; the message says what and where."""


@attrs.frozen
class ServicePort:
    """One service an image declares: its name, ``http`` or ``tcp``, and its container port."""

    name: str
    protocol: str
    port: int


@attrs.frozen
class ServiceDefinition:
    """
    How a service starts: ``command`` (argv, non-empty), ``env`` (added to the kernel's
    environment) and an optional ``url_template`` for the client; all may hold placeholders.
    """

    command: tuple[str, ...]
    env: Mapping[str, str] = attrs.field(factory=dict)
    url_template: Optional[str] = None


def parse_service_ports(label: str) -> dict[str, ServicePort]:
    """
    The services of an ``ai.backend.service-ports`` label value, by name, in label order.
    An empty label declares none. Raises ``ServiceDeclarationError`` on any bad item or on
    a duplicate name or port: a half-understood label would start the wrong program.
    """
    if len(label) > MAX_LABEL_LENGTH:
        raise ServiceDeclarationError(f"{SERVICE_PORTS_LABEL} is longer than {MAX_LABEL_LENGTH} characters")
    services: dict[str, ServicePort] = {}
    ports: dict[int, str] = {}
    if not label.strip():
        return services
    for item in label.split(","):
        item = item.strip()
        parts = item.split(":")
        if len(parts) != 3:
            raise ServiceDeclarationError(f"service port {item!r} is not name:protocol:port")
        name, protocol, port_text = parts
        if not NAME_PATTERN.match(name):
            raise ServiceDeclarationError(
                f"service name {name!r} must be a lower-case letter then up to 31 of [a-z0-9-]"
            )
        if protocol not in PROTOCOLS:
            raise ServiceDeclarationError(f"service {name!r}: protocol {protocol!r} is not one of {PROTOCOLS}")
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise ServiceDeclarationError(f"service {name!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not MIN_PORT <= port <= MAX_PORT:
            raise ServiceDeclarationError(f"service {name!r}: port {port} is not in {MIN_PORT}..{MAX_PORT}")
        if name in services:
            raise ServiceDeclarationError(f"service {name!r} is declared twice")
        if port in ports:
            raise ServiceDeclarationError(f"services {ports[port]!r} and {name!r} declare the same port {port}")
        services[name] = ServicePort(name, protocol, port)
        ports[port] = name
    return services


def declared_services(labels: Mapping[str, str], log: Logger) -> dict[str, ServicePort]:
    """
    The services an image's labels declare; a bad label is logged and declares none, so
    that a kernel of a badly labelled image still runs (without services).
    """
    label = labels.get(SERVICE_PORTS_LABEL)
    if label is None:
        return {}
    try:
        return parse_service_ports(label)
    except ServiceDeclarationError as error:
        log.warn("ignoring the image label {label}: {error}", label=SERVICE_PORTS_LABEL, error=str(error))
        return {}


def _check_template(text: str, where: str) -> None:
    if "\0" in text:
        raise ServiceDeclarationError(f"{where} contains a NUL character")
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ServiceDeclarationError(f"{where}: bad braces ({error}); write {{{{ and }}}} for literal ones") from None
    for _literal, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ServiceDeclarationError(
                f"{where}: placeholder {shown} is not one of " + ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            )


def parse_service_definition(document: Union[bytes, str], name: str = "service") -> ServiceDefinition:
    """
    A service definition from its JSON text (``name`` only labels the messages). Raises
    ``ServiceDeclarationError`` for anything but the documented shape: the file comes from
    the image, and its command will run in the kernel.
    """
    size = len(document.encode("utf-8") if isinstance(document, str) else document)
    if size > MAX_DEFINITION_BYTES:
        raise ServiceDeclarationError(f"definition of {name!r} is {size} bytes, more than {MAX_DEFINITION_BYTES}")
    try:
        value: Any = json.loads(document)
    except (ValueError, RecursionError) as error:
        raise ServiceDeclarationError(f"definition of {name!r} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ServiceDeclarationError(f"definition of {name!r} is not a JSON object")
    unknown = sorted(set(value) - {"command", "env", "url_template"})
    if unknown:
        raise ServiceDeclarationError(f"definition of {name!r} has unknown keys {unknown}")
    command = value.get("command")
    if not isinstance(command, list) or not command:
        raise ServiceDeclarationError(f"definition of {name!r}: command must be a non-empty list of strings")
    if len(command) > MAX_ARGV_ITEMS:
        raise ServiceDeclarationError(f"definition of {name!r}: command has more than {MAX_ARGV_ITEMS} items")
    for index, argument in enumerate(command):
        if not isinstance(argument, str):
            raise ServiceDeclarationError(f"definition of {name!r}: command[{index}] is not a string")
        _check_template(argument, f"definition of {name!r}: command[{index}]")
    env = value.get("env", {})
    if not isinstance(env, dict):
        raise ServiceDeclarationError(f"definition of {name!r}: env must be an object of strings")
    if len(env) > MAX_ENV_ITEMS:
        raise ServiceDeclarationError(f"definition of {name!r}: env has more than {MAX_ENV_ITEMS} entries")
    for key, item in env.items():
        if not ENV_NAME_PATTERN.match(key):
            raise ServiceDeclarationError(f"definition of {name!r}: env name {key!r} is not a variable name")
        if not isinstance(item, str):
            raise ServiceDeclarationError(f"definition of {name!r}: env {key} is not a string")
        _check_template(item, f"definition of {name!r}: env {key}")
    template = value.get("url_template")
    if template is not None:
        if not isinstance(template, str):
            raise ServiceDeclarationError(f"definition of {name!r}: url_template is not a string")
        _check_template(template, f"definition of {name!r}: url_template")
    return ServiceDefinition(tuple(command), dict(env), template)


def render(definition: ServiceDefinition, port: int, token: str, home: str) -> tuple[list[str], dict[str, str]]:
    """
    The argv and the added environment of a service to start: placeholders filled with
    the container-side ``port``, the service ``token``, the user's ``home``, and for
    ``{host}`` the container's loopback, where the service must listen for the relay.
    """
    values = {"host": CONTAINER_HOST, "port": str(port), "token": token, "home": home}
    argv = [argument.format_map(values) for argument in definition.command]
    env = {key: item.format_map(values) for key, item in definition.env.items()}
    return argv, env


def url(template: Optional[str], host: str, port: int, token: str, home: str = DEFAULT_HOME) -> Optional[str]:
    """
    The URL a client opens, from a definition's ``url_template`` with the host and host
    port it dials (the relay's, not the container's); ``None`` without a template.
    """
    if template is None:
        return None
    return template.format_map({"host": host, "port": str(port), "token": token, "home": home})
