"""
Image references (``[registry[:port]/]repository[:tag][@digest]``), checked before anything
is sent to Docker.

The grammar is Docker's (the distribution project's reference grammar): a first component
is a registry when it has a ``.`` or a ``:``, or is ``localhost``; path components are
lower-case alphanumerics joined by ``.``, ``_``, ``__`` or runs of ``-``; a tag is at most
128 of ``[A-Za-z0-9_.-]`` not starting with ``.`` or ``-``; a digest is
``sha256:`` and 64 lower-case hex digits (the only algorithm Docker pulls by). A reference
without a registry is Docker's default one (``docker.io``), and one without a tag or digest
means ``:latest``, as for ``docker pull``.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["DEFAULT_REGISTRY", "ImageReference", "InvalidReference", "parse_reference"]

DEFAULT_REGISTRY = "docker.io"
MAX_NAME_LENGTH = 255  # the repository with its registry, as Docker bounds it
MAX_REFERENCE_LENGTH = 512

_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\Z")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]\Z")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


class InvalidReference(ValueError):
    """Not an image reference Docker would pull; the message says what is wrong."""


@attrs.frozen
class ImageReference:
    """A checked reference: ``registry`` (``host[:port]``), ``repository``, and a ``tag`` or a ``digest``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    #: Whether the text named its registry (``docker.io/library/x`` and ``x`` are one image,
    #: but Docker lists the second as ``x``).
    explicit_registry: bool = True

    @property
    def name(self) -> str:
        """The repository as Docker names it locally (without ``docker.io/`` when it was left out)."""
        if self.explicit_registry:
            return f"{self.registry}/{self.repository}"
        repository = self.repository
        return repository[len("library/") :] if repository.startswith("library/") else repository

    def __str__(self) -> str:
        """What Docker pulls and lists: ``name:tag`` or ``name@digest``."""
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"


def parse_reference(text: object) -> ImageReference:
    """The ``ImageReference`` ``text`` names; ``InvalidReference`` saying why when it names none."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("an image reference must be a non-empty string")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(f"an image reference is at most {MAX_REFERENCE_LENGTH} characters")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise InvalidReference("an image reference has no spaces, controls or non-ASCII characters")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference("a digest is sha256: and 64 lower-case hex digits")
    registry, explicit = DEFAULT_REGISTRY, False
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, explicit, rest = _registry(first), True, remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference("a tag is 1 to 128 of A-Z a-z 0-9 _ . - and starts with none of . -")
    if not rest:
        raise InvalidReference("an image reference names a repository")
    for component in rest.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise InvalidReference(
                "a repository is lower-case letters and digits, in components joined by / "
                "and, within one, by . _ __ or -"
            )
    repository = rest if explicit or "/" in rest else f"library/{rest}"
    if len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
        raise InvalidReference(f"an image name is at most {MAX_NAME_LENGTH} characters")
    return ImageReference(registry, repository, tag, digest, explicit)


def _registry(text: str) -> str:
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1 :]
        if not _IPV6.match(host) or (rest and not rest.startswith(":")):
            raise InvalidReference("a registry address in brackets is an IPv6 address")
        port = rest[1:] if rest else None
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    if not host.startswith("[") and not _HOST.match(host):
        raise InvalidReference("a registry host is DNS labels joined by dots (letters, digits, -)")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536 or port != str(int(port))):
        raise InvalidReference("a registry port is a number from 1 to 65535")
    return text
