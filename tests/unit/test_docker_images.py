"""Kernel images from inspect documents: label parsing, validation, legacy labels."""

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs

from bai_agent.docker.images import (
    KernelImage,
    kernel_image_from_inspect,
    kernel_images_from_inspect,
)
from bai_agent.values import parse_size

IMAGE_ID = "sha256:" + "ab" * 32


def inspect_doc(labels, tags=("bai/python:3.11",), legacy=False, image_id=IMAGE_ID):
    return {
        "Id": image_id,
        "RepoTags": list(tags),
        "Config": {"Labels": None if legacy else labels},
        "ContainerConfig": {"Labels": labels if legacy else None},
    }


def warnings(events):
    return [e for e in events if e["log_level"] >= LogLevel.warn]


def test_full_labels_make_a_kernel_image():
    labels = {
        "ai.backend.kernelspec": "1",
        "ai.backend.runtime-type": "shell",
        "ai.backend.runtime-path": "/bin/bash",
        "ai.backend.features": "batch query",
        "ai.backend.resource.min.mem": "256m",
        "ai.backend.envs.corecount": "OMP_NUM_THREADS NPROC",
        "maintainer": "someone",
    }
    image = kernel_image_from_inspect("bai/python:3.11", inspect_doc(labels))
    assert image == KernelImage(
        name="bai/python:3.11",
        id=IMAGE_ID,
        runtime_type="shell",
        runtime_path="/bin/bash",
        features=("query", "batch"),
        labels=labels,
        min_mem=256 * 1024**2,
        corecount_envs=("OMP_NUM_THREADS", "NPROC"),
    )


def test_only_the_kernelspec_label_gives_the_defaults():
    image = kernel_image_from_inspect("k:1", inspect_doc({"ai.backend.kernelspec": "1"}))
    assert (image.runtime_type, image.runtime_path, image.features, image.min_mem, image.corecount_envs) == (
        "python",
        "/usr/bin/python3",
        (),
        0,
        (),
    )


@pytest.mark.parametrize(
    "labels",
    [{}, {"ai.backend.kernelspec": "0"}, {"ai.backend.kernelspec": "true"}, {"other": "1"}],
)
def test_images_without_kernelspec_1_are_not_kernel_images(labels):
    with capturedLogs() as events:
        assert kernel_image_from_inspect("k:1", inspect_doc(labels)) is None
    assert warnings(events) == []


def test_legacy_container_config_labels_are_read():
    labels = {"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "shell"}
    image = kernel_image_from_inspect("k:1", inspect_doc(labels, legacy=True))
    assert image.runtime_type == "shell"
    assert dict(image.labels) == labels


def test_config_labels_win_over_legacy_labels():
    doc = inspect_doc({"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "python"})
    doc["ContainerConfig"]["Labels"] = {"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "shell"}
    assert kernel_image_from_inspect("k:1", doc).runtime_type == "python"


@pytest.mark.parametrize(
    "bad_labels, reason",
    [
        ({"ai.backend.runtime-type": "ruby"}, "runtime-type"),
        ({"ai.backend.runtime-type": ""}, "runtime-type"),
        ({"ai.backend.runtime-path": "python3"}, "runtime-path"),
        ({"ai.backend.runtime-path": ""}, "runtime-path"),
        ({"ai.backend.resource.min.mem": "lots"}, "min.mem"),
        ({"ai.backend.resource.min.mem": "-1m"}, "min.mem"),
        ({"ai.backend.resource.min.mem": "12x"}, "min.mem"),
        ({"ai.backend.resource.min.mem": ""}, "min.mem"),
        ({"ai.backend.envs.corecount": "OMP_NUM_THREADS 1BAD"}, "corecount"),
        ({"ai.backend.envs.corecount": "A-B"}, "corecount"),
    ],
)
def test_invalid_labels_skip_the_image_with_a_warning(bad_labels, reason):
    labels = {"ai.backend.kernelspec": "1", **bad_labels}
    with capturedLogs() as events:
        assert kernel_image_from_inspect("bad:1", inspect_doc(labels)) is None
        assert kernel_images_from_inspect([inspect_doc(labels, tags=["bad:1"])]) == []
    [first, second] = warnings(events)
    assert first["image"] == "bad:1"
    assert reason in first["reason"]


def test_unknown_features_are_dropped_with_a_warning():
    labels = {"ai.backend.kernelspec": "1", "ai.backend.features": "user-input teleport query query"}
    with capturedLogs() as events:
        image = kernel_image_from_inspect("k:1", inspect_doc(labels))
    assert image.features == ("query", "user-input")
    [warning] = warnings(events)
    assert warning["unknown"] == ["teleport"]


@pytest.mark.parametrize(
    "text, size",
    [
        ("256m", 256 * 1024**2),
        ("256M", 256 * 1024**2),
        ("1g", 1024**3),
        ("1.5g", 3 * 1024**3 // 2),
        ("512MiB", 512 * 1024**2),
        ("64kb", 64 * 1024),
        ("1048576", 1048576),
        (" 2g ", 2 * 1024**3),
        (4096, 4096),
    ],
)
def test_min_mem_sizes_parse_like_every_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "1.g", "-5", "5 bytes", "1e9", "0x10", None, True, -1, 1.5])
def test_min_mem_sizes_refuse_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        "sha256:x",
        {},
        {"RepoTags": ["k:1"]},
        {"Id": IMAGE_ID, "RepoTags": ["k:1"], "Config": None, "ContainerConfig": None},
        {"Id": IMAGE_ID, "RepoTags": ["k:1"], "Config": {"Labels": ["ai.backend.kernelspec=1"]}},
        {"RepoTags": ["k:1"], "Config": {"Labels": {"ai.backend.kernelspec": "1"}}},
        {"Id": 7, "RepoTags": ["k:1"], "Config": {"Labels": {"ai.backend.kernelspec": "1"}}},
    ],
)
def test_malformed_documents_never_raise(doc):
    assert kernel_image_from_inspect("k:1", doc) is None
    assert kernel_images_from_inspect([doc]) == []


@given(
    labels=st.dictionaries(
        st.sampled_from(
            [
                "ai.backend.runtime-type",
                "ai.backend.runtime-path",
                "ai.backend.features",
                "ai.backend.resource.min.mem",
                "ai.backend.envs.corecount",
                "other",
            ]
        ),
        st.text(max_size=20),
    )
)
def test_any_label_values_give_an_image_or_none_never_an_error(labels):
    labels = {"ai.backend.kernelspec": "1", **labels}
    image = kernel_image_from_inspect("k:1", inspect_doc(labels))
    assert image is None or image.runtime_type in ("python", "shell")


def test_one_kernel_image_per_repo_tag():
    kernel = inspect_doc({"ai.backend.kernelspec": "1"}, tags=["bai/python:3.11", "bai/python:latest"])
    plain = inspect_doc({"maintainer": "x"}, tags=["debian:12"], image_id="sha256:" + "cd" * 32)
    untagged = inspect_doc({"ai.backend.kernelspec": "1"}, tags=["<none>:<none>"], image_id="sha256:" + "ef" * 32)
    null_tags = dict(untagged, RepoTags=None)
    images = kernel_images_from_inspect([kernel, plain, untagged, null_tags])
    assert [(i.name, i.id) for i in images] == [("bai/python:3.11", IMAGE_ID), ("bai/python:latest", IMAGE_ID)]


def test_to_json_is_the_list_images_entry():
    labels = {"ai.backend.kernelspec": "1", "ai.backend.runtime-type": "shell"}
    image = kernel_image_from_inspect("k:1", inspect_doc(labels))
    assert image.to_json() == {"name": "k:1", "id": IMAGE_ID, "runtime_type": "shell", "labels": labels}


def test_kernel_images_are_frozen_hashable_values():
    labels = {"ai.backend.kernelspec": "1"}
    image = kernel_image_from_inspect("k:1", inspect_doc(labels))
    labels["ai.backend.kernelspec"] = "0"  # the caller's dict is copied
    assert image.labels["ai.backend.kernelspec"] == "1"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        image.name = "other"
    with pytest.raises(TypeError):
        image.labels["x"] = "y"
    assert {image, kernel_image_from_inspect("k:1", inspect_doc({"ai.backend.kernelspec": "1"}))} == {image}
