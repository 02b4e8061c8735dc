"""
Registry credentials (docs/protocol.md section 8): a request's ``registry_auth``, or the
operator's Json at ``/bai/{ns}/config/registries/{host[:port]}`` in etcd, read at each pull
that needs it (so that a change applies without a restart), checked like a manager's.

A ``Credentials`` never shows its password: not in its ``repr``, not in an error message.
``scrub`` takes it out of text that came from elsewhere (a registry's message) before that
text is logged, journalled or answered.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from bai_agent.protocol import errors
from bai_agent.protocol.keys import registry_key

__all__ = ["Credentials", "RegistryCredentials", "parse_registry_auth", "scrub"]

MAX_FIELD_LENGTH = 1024
MAX_DOCUMENT_BYTES = 8 * 1024
HIDDEN = "<hidden>"

log = Logger()


@attrs.frozen
class Credentials:
    username: str
    password: str = attrs.field(repr=False)

    def header(self, registry: str) -> str:
        """The ``X-Registry-Auth`` value Docker takes: base64url of the Json."""
        document = {"username": self.username, "password": self.password, "serveraddress": registry}
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


def parse_registry_auth(value: Any, where: str = "registry_auth") -> Credentials | None:
    """
    ``{"username", "password"}`` (strings of 1 to 1024 characters, no control characters)
    as ``Credentials``; None for None. ``InvalidRequest`` naming ``where`` otherwise; the
    message never holds the value.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"username", "password"}:
        raise errors.InvalidRequest(f'{where} must be {{"username": ..., "password": ...}} and nothing else')
    for field in ("username", "password"):
        text = value[field]
        if not isinstance(text, str) or not 0 < len(text) <= MAX_FIELD_LENGTH or not text.isprintable():
            raise errors.InvalidRequest(f"{where}.{field} must be 1 to {MAX_FIELD_LENGTH} printable characters")
    return Credentials(value["username"], value["password"])


def scrub(text: str, credentials: Credentials | None) -> str:
    """``text`` without the password (and its base64 forms) of ``credentials``."""
    if credentials is None:
        return text
    for secret in {credentials.password, base64.b64encode(credentials.password.encode()).decode()}:
        if secret:
            text = text.replace(secret, HIDDEN)
    return text


class RegistryCredentials:
    """
    The operator's credentials in etcd.

    :param etcd: an ``IEtcd``.
    :param namespace: the agent's namespace.
    """

    def __init__(self, etcd: Any, namespace: str) -> None:
        self.etcd = etcd
        self.namespace = namespace

    @inlineCallbacks
    def lookup(self, registry: str) -> Generator[Deferred[Any], Any, Credentials | None]:
        """The credentials set for ``registry`` (``host[:port]``), or None (none set, or unusable: logged)."""
        key = registry_key(self.namespace, registry)
        try:
            raw = yield self.etcd.get(key)
        except Exception as e:
            # No credentials is what a pull without them does: the registry says if it minds.
            log.warn(
                "cannot read the credentials of registry {registry} from etcd: {error}", registry=registry, error=e
            )
            return None
        if raw is None:
            return None
        try:
            if len(raw) > MAX_DOCUMENT_BYTES:
                raise ValueError(f"more than {MAX_DOCUMENT_BYTES} bytes")
            return parse_registry_auth(json.loads(raw), key.decode("utf-8", "replace"))
        except (ValueError, errors.InvalidRequest) as e:
            # The reason only: the value may hold a password, misspelt.
            reason = str(e) if isinstance(e, errors.AgentError) else "not Json"
            log.warn(
                "the credentials of registry {registry} in etcd are unusable: {reason}",
                registry=registry,
                reason=reason,
            )
            return None
