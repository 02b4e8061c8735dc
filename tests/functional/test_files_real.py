"""File commands on a real kernel through a real agent: the path rules hold over AMP."""

import json
import os

import pytest
import pytest_twisted

from bai_agent.protocol import errors
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


@pytest_twisted.inlineCallbacks
def test_upload_download_list_and_the_kernel_sees_the_files(client, agent):
    yield client.create_kernel("f", IMAGE, {"cpu": 0.5, "mem": "128m"})
    blob = os.urandom(3 * (1 << 20) + 17)
    size = 0
    for offset in range(0, len(blob), 1 << 20):
        answer = yield client.upload_file("f", "data/blob.bin", blob[offset : offset + (1 << 20)], append=offset > 0)
        size = answer["size"]
    assert size == len(blob)
    got = b""
    while True:
        answer = yield client.download_file("f", "data/blob.bin", offset=len(got), length=1 << 20)
        got += answer["data"]
        if answer["eof"]:
            break
    assert got == blob
    listing = yield client.list_files("f", "data")
    assert [(e["name"], e["type"], e["size"]) for e in listing] == [("blob.bin", "file", len(blob))]
    console, _ = yield run_to_end(client, "f", "query", "import os; print(os.path.getsize('data/blob.bin'))")
    assert text(console) == f"{len(blob)}\n"


@pytest_twisted.inlineCallbacks
def test_paths_out_of_the_home_are_refused(client, agent):
    yield client.create_kernel("g", IMAGE, {"cpu": 0.5, "mem": "128m"})
    yield run_to_end(client, "g", "query", "import os; os.symlink('/', 'root'); os.mkdir('d')")
    for path in ("/etc/passwd", "../x", "a/../../x", "root", "root/etc/passwd"):
        with pytest.raises(errors.PathNotAllowed):
            yield client.download_file("g", path, 0, 100)
        with pytest.raises(errors.PathNotAllowed):
            yield client.upload_file("g", path, b"x")
    with pytest.raises(errors.FileNotFound):
        yield client.download_file("g", "missing.txt", 0, 10)
    with pytest.raises(errors.InvalidRequest):
        yield client.download_file("g", "d", 0, 10)  # a directory
    with pytest.raises(errors.InvalidRequest):
        yield client.download_file("g", "x", 0, (1 << 20) + 1)
    with pytest.raises(errors.KernelNotFound):
        yield client.list_files("ghost")


@pytest_twisted.inlineCallbacks
def test_upload_past_the_size_cap_is_file_too_large(client, agent):
    yield client.create_kernel("h", IMAGE, {"cpu": 0.5, "mem": "128m"})
    chunk = b"x" * (1 << 20)
    for _ in range(5):
        yield client.upload_file("h", "big", chunk, append=True)
    with pytest.raises(errors.FileTooLarge):
        yield client.upload_file("h", "big", b"x", append=True)
    listing = yield client.list_files("h")
    assert [e["size"] for e in listing if e["name"] == "big"] == [5 << 20]


@pytest_twisted.inlineCallbacks
def test_ctl_upload_download_ls_logs(client, agent, tmp_path):
    yield client.create_kernel("c", IMAGE, {"cpu": 0.5, "mem": "128m"})
    address = f"127.0.0.1:{agent.amp_port}"
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom((1 << 20) * 2 + 5))
    secret = agent.secret_path
    done = agent.ctl("upload", address, "c", str(source), "sub/in.bin", secret_file=secret)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{(1 << 20) * 2 + 5} bytes"
    listing = agent.ctl("ls", address, "c", "sub", secret_file=secret)
    assert "in.bin" in listing.stdout and str((1 << 20) * 2 + 5) in listing.stdout
    back = tmp_path / "back.bin"
    done = agent.ctl("download", address, "c", "sub/in.bin", str(back), secret_file=secret)
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == source.read_bytes()
    refused = agent.ctl("download", address, "c", "../../etc/passwd", str(tmp_path / "no"), secret_file=secret)
    assert refused.returncode == 1 and "PathNotAllowed" in refused.stderr
    assert not (tmp_path / "no").exists() and not (tmp_path / "no.part").exists()
    logs = agent.ctl("logs", address, "c", "--tail", "5", secret_file=secret)
    assert "listening on /run/bai/runner.sock" in logs.stdout
    stats = agent.ctl("stats", address, "c", secret_file=secret)
    assert stats.returncode == 0, stats.stderr
    sample = json.loads(stats.stdout)
    assert sample["pids"] >= 1 and sample["mem_bytes"] > 0  # the runner is there
    assert {"cpu_used_ms", "cpu_util", "scratch_bytes", "sampled_at"} <= set(sample)
