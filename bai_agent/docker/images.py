"""
Kernel images: local Docker images labelled ``ai.backend.kernelspec=1`` (PROTOCOL.md
section 5), read from ``GET /images/{name}/json`` documents.

Everything here is pure: a bad label never raises, it makes the image be skipped (or the
bad feature dropped) with a warning in the log.
"""

import re
import types
from collections.abc import Mapping
from typing import Optional

import attrs
from twisted.logger import Logger

from bai_agent.protocol.labels import (
    CORECOUNT_ENVS_LABEL,
    FEATURES_LABEL,
    KERNELSPEC_LABEL,
    MIN_MEM_LABEL,
    RUNTIME_PATH_LABEL,
    RUNTIME_TYPE_LABEL,
)
from bai_agent.values import parse_size

log = Logger()

RUNTIME_TYPES = ("python", "shell")
DEFAULT_RUNTIME_TYPE = "python"
DEFAULT_RUNTIME_PATH = "/usr/bin/python3"
#: Known features, in the order ``KernelImage.features`` lists them.
FEATURES = ("query", "batch", "user-input")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def _freeze_labels(labels):
    return types.MappingProxyType(dict(labels))


@attrs.frozen
class KernelImage:
    """
    One kernel image under one ``name:tag``. ``labels`` holds all the image's labels
    (read-only); ``min_mem`` is in bytes (0: no minimum).
    """

    name: str
    id: str
    runtime_type: str = DEFAULT_RUNTIME_TYPE
    runtime_path: str = DEFAULT_RUNTIME_PATH
    features: tuple[str, ...] = ()
    labels: Mapping[str, str] = attrs.field(
        factory=dict, converter=_freeze_labels, hash=False, repr=lambda labels: repr(dict(labels))
    )
    min_mem: int = 0
    corecount_envs: tuple[str, ...] = ()

    def to_json(self):
        """The ``ListImages`` entry (PROTOCOL.md section 2)."""
        return {
            "name": self.name,
            "id": self.id,
            "runtime_type": self.runtime_type,
            "labels": dict(self.labels),
        }


class _InvalidSpec(ValueError):
    """A kernel image's labels are unusable; the message says which and why."""


def image_labels(doc):
    """
    The labels of an inspected image: ``Config.Labels``, or the legacy
    ``ContainerConfig.Labels`` when the former are empty. Always a dict.
    """
    for section in ("Config", "ContainerConfig"):
        config = doc.get(section)
        labels = config.get("Labels") if isinstance(config, dict) else None
        if isinstance(labels, dict) and labels:
            return labels
    return {}


def _spec_from_labels(labels, image):
    """The KernelImage fields other than name and id; raise ``_InvalidSpec``."""
    runtime_type = labels.get(RUNTIME_TYPE_LABEL, DEFAULT_RUNTIME_TYPE)
    if runtime_type not in RUNTIME_TYPES:
        raise _InvalidSpec(f"{RUNTIME_TYPE_LABEL}={runtime_type!r} is not one of {RUNTIME_TYPES}")

    runtime_path = labels.get(RUNTIME_PATH_LABEL, DEFAULT_RUNTIME_PATH)
    if not isinstance(runtime_path, str) or not runtime_path.startswith("/"):
        raise _InvalidSpec(f"{RUNTIME_PATH_LABEL}={runtime_path!r} is not an absolute path")

    requested = str(labels.get(FEATURES_LABEL, "")).split()
    unknown = sorted(set(requested) - set(FEATURES))
    if unknown:
        log.warn(
            "image {image}: ignoring unknown features {unknown} (known: {known})",
            image=image,
            unknown=unknown,
            known=FEATURES,
        )
    features = tuple(f for f in FEATURES if f in requested)

    min_mem = 0
    if MIN_MEM_LABEL in labels:
        try:
            min_mem = parse_size(labels[MIN_MEM_LABEL])
        except ValueError as e:
            raise _InvalidSpec(f"{MIN_MEM_LABEL}: {e}") from e

    corecount_envs = tuple(str(labels.get(CORECOUNT_ENVS_LABEL, "")).split())
    bad_envs = [name for name in corecount_envs if not _ENV_NAME.match(name)]
    if bad_envs:
        raise _InvalidSpec(f"{CORECOUNT_ENVS_LABEL}: invalid variable names {bad_envs}")

    return dict(
        runtime_type=runtime_type,
        runtime_path=runtime_path,
        features=features,
        labels=labels,
        min_mem=min_mem,
        corecount_envs=corecount_envs,
    )


def _kernel_spec(doc, image):
    """KernelImage fields but the name, or None (logged) when not a usable kernel image."""
    try:
        if not isinstance(doc, dict):
            raise _InvalidSpec(f"not an image document: {type(doc).__name__}")
        labels = image_labels(doc)
        if labels.get(KERNELSPEC_LABEL) != "1":
            return None
        image_id = doc.get("Id")
        if not isinstance(image_id, str) or not image_id:
            raise _InvalidSpec("the document has no Id")
        spec = _spec_from_labels(labels, image)
    except _InvalidSpec as e:
        log.warn("image {image} is not usable as a kernel image: {reason}", image=image, reason=str(e))
        return None
    except Exception:
        log.failure("image {image}: unreadable inspect document", image=image)
        return None
    spec["id"] = image_id
    return spec


def kernel_image_from_inspect(name, doc) -> Optional[KernelImage]:
    """
    The ``KernelImage`` named ``name`` described by the inspect document ``doc``, or
    None when it is not a kernel image or its labels are invalid (logged).
    """
    spec = _kernel_spec(doc, name)
    return None if spec is None else KernelImage(name=name, **spec)


def kernel_images_from_inspect(inspect_docs):
    """One ``KernelImage`` per ``name:tag`` in the ``RepoTags`` of each kernel image."""
    images: list[KernelImage] = []
    for doc in inspect_docs:
        tags = doc.get("RepoTags") if isinstance(doc, dict) else None
        tags = [t for t in tags or () if isinstance(t, str) and t != "<none>:<none>"]
        if not tags:
            continue
        spec = _kernel_spec(doc, tags[0])
        if spec is not None:
            images.extend(KernelImage(name=tag, **spec) for tag in tags)
    return images
