"""
Files in a kernel's home: upload, download, list, and the attacks the kernel user can make
on the agent through the home it controls (symbolic links, FIFOs, devices, hard links,
swaps racing the agent).

These tests run as root, as the agent does: they chown to the kernel user and make device
nodes.
"""

import ctypes
import errno
import os
import stat
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bai_agent.kernels import files
from bai_agent.kernels.files import MAX_CHUNK, download, list_files, resolve, upload
from bai_agent.kernels.workspace import KERNEL_GID, KERNEL_UID
from bai_agent.protocol.errors import (
    AgentError,
    FileNotFound,
    FileTooLarge,
    InvalidRequest,
    PathNotAllowed,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as the agent: chown to uid 1000 and mknod")

MIB = 1 << 20
CAP = 100 * MIB
CANARY = b"CANARY-outside-the-home-0123456789"
MARKER = "only-outside"
TIMEOUT = 5.0


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "scratch" / "kernel-1"
    path.mkdir(parents=True)
    os.chown(path, KERNEL_UID, KERNEL_GID)
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture
def outside(tmp_path):
    """A directory beside the scratch root, with a canary file the kernel must never reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "canary").write_bytes(CANARY)
    return str(path)


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def download_all(home, path, chunk):
    data, offset = b"", 0
    while True:
        piece, size, eof = download(home, path, offset, chunk)
        data += piece
        offset += len(piece)
        if eof:
            return data, size


def finishes(function, *args):
    """Run ``function`` in a thread; answer its result or raise its error; fail if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{function.__name__}{args[1:]} hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# Path rules


@pytest.mark.parametrize(
    "path, components",
    [
        ("a", ["a"]),
        ("a/b/c.txt", ["a", "b", "c.txt"]),
        ("./a//b/./", ["a", "b"]),
        (".", []),
        ("", []),
        ("..a/b..", ["..a", "b.."]),
    ],
)
def test_resolve_normalises_dot_and_empty_components(home, path, components):
    assert resolve(home, path) == components


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "/", "../x", "..", "a/../../x", "a/./../..", "a/../b", "a/..", "x\0y", "\0"],
)
def test_resolve_refuses_escapes(home, path):
    with pytest.raises(PathNotAllowed):
        resolve(home, path)


def test_resolve_refuses_paths_over_4096_bytes(home):
    assert len(resolve(home, "a/" * 2048)) == 2048
    with pytest.raises(PathNotAllowed, match="4096"):
        resolve(home, "a/" * 2048 + "b")
    with pytest.raises(PathNotAllowed):
        resolve(home, "\u00e9" * 2049)  # 4098 bytes in UTF-8


def test_resolve_refuses_what_is_not_text(home):
    with pytest.raises(InvalidRequest):
        resolve(home, b"a")
    with pytest.raises(InvalidRequest):
        resolve(home, "\ud800")


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a/./../..", "x\0y"])
def test_every_operation_refuses_escaping_paths(home, path):
    with pytest.raises(PathNotAllowed):
        upload(home, path, b"x", False, CAP)
    with pytest.raises(PathNotAllowed):
        download(home, path, 0, 10)
    with pytest.raises(PathNotAllowed):
        list_files(home, path)
    assert os.listdir(home) == []


# Upload


def test_upload_creates_a_file_owned_by_the_kernel_user(home):
    assert upload(home, "hello.txt", b"hello", False, CAP) == 5
    assert read(home, "hello.txt") == b"hello"
    info = os.stat(os.path.join(home, "hello.txt"))
    assert (info.st_uid, info.st_gid) == (KERNEL_UID, KERNEL_GID)
    assert stat.S_IMODE(info.st_mode) == 0o644


def test_upload_appends(home):
    upload(home, "log", b"one,", True, CAP)
    assert upload(home, "log", b"two", True, CAP) == 7
    assert read(home, "log") == b"one,two"


def test_upload_overwrites(home):
    upload(home, "f", b"a long first version", False, CAP)
    assert upload(home, "f", b"short", False, CAP) == 5
    assert read(home, "f") == b"short"


def test_upload_of_empty_data_makes_an_empty_file(home):
    assert upload(home, "empty", b"", False, CAP) == 0
    assert read(home, "empty") == b""


def test_upload_keeps_the_mode_and_owner_of_an_existing_file(home):
    path = os.path.join(home, "script.sh")
    write(path, b"old")
    os.chown(path, KERNEL_UID, KERNEL_GID)
    os.chmod(path, 0o700)
    upload(home, "script.sh", b"new", False, CAP)
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == KERNEL_UID


def test_upload_makes_missing_directories_owned_by_the_kernel_user(home):
    old_umask = os.umask(0o077)
    try:
        assert upload(home, "a/b/c/data.bin", b"\x00\x01", False, CAP) == 2
    finally:
        os.umask(old_umask)
    assert read(home, "a", "b", "c", "data.bin") == b"\x00\x01"
    for relative in ("a", "a/b", "a/b/c"):
        info = os.stat(os.path.join(home, relative))
        assert stat.S_ISDIR(info.st_mode)
        assert (info.st_uid, info.st_gid) == (KERNEL_UID, KERNEL_GID)
        assert stat.S_IMODE(info.st_mode) == 0o755
    info = os.stat(os.path.join(home, "a/b/c/data.bin"))
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (KERNEL_UID, 0o644)


def test_upload_into_an_existing_directory_leaves_its_owner(home):
    os.mkdir(os.path.join(home, "mine"))  # root's, as if an operator had made it
    upload(home, "mine/f", b"x", False, CAP)
    assert os.stat(os.path.join(home, "mine")).st_uid == 0


def test_upload_size_cap_allows_an_exact_fit(home):
    assert upload(home, "f", b"x" * 10, False, 10) == 10
    upload(home, "g", b"x" * 6, False, 10)
    assert upload(home, "g", b"y" * 4, True, 10) == 10
    assert read(home, "g") == b"xxxxxxyyyy"


def test_upload_one_byte_over_the_cap_is_refused_and_the_file_unchanged(home):
    upload(home, "f", b"x" * 6, False, 10)
    with pytest.raises(FileTooLarge):
        upload(home, "f", b"y" * 5, True, 10)
    assert read(home, "f") == b"x" * 6
    with pytest.raises(FileTooLarge):
        upload(home, "f", b"z" * 11, False, 10)
    assert read(home, "f") == b"x" * 6


def test_upload_over_the_cap_creates_nothing(home):
    with pytest.raises(FileTooLarge):
        upload(home, "dir/new", b"z" * 11, False, 10)
    with pytest.raises(FileTooLarge):
        upload(home, "new", b"z" * 11, True, 10)
    assert os.listdir(home) == []


def test_upload_refuses_more_than_one_mib_a_call(home):
    assert upload(home, "f", b"x" * MAX_CHUNK, False, CAP) == MAX_CHUNK
    with pytest.raises(InvalidRequest, match="at most"):
        upload(home, "g", b"x" * (MAX_CHUNK + 1), False, CAP)
    assert not os.path.exists(os.path.join(home, "g"))


@pytest.mark.parametrize("path", [".", "", "./"])
def test_upload_to_the_home_itself_is_refused(home, path):
    with pytest.raises(InvalidRequest):
        upload(home, path, b"x", False, CAP)


def test_upload_onto_a_directory_is_refused(home):
    os.mkdir(os.path.join(home, "d"))
    with pytest.raises(InvalidRequest, match="is a directory"):
        upload(home, "d", b"x", False, CAP)


def test_upload_under_a_file_is_refused(home):
    write(os.path.join(home, "f"), b"content")
    with pytest.raises(InvalidRequest, match="not a directory"):
        upload(home, "f/g", b"x", False, CAP)
    assert read(home, "f") == b"content"


@pytest.mark.parametrize(
    "arguments",
    [("not bytes", False, CAP), (b"x", "yes", CAP), (b"x", False, -1), (b"x", False, True)],
)
def test_upload_refuses_bad_arguments(home, arguments):
    with pytest.raises(InvalidRequest):
        upload(home, "f", *arguments)


def test_upload_of_a_name_too_long_is_an_invalid_request(home):
    with pytest.raises(InvalidRequest, match="too long"):
        upload(home, "n" * 300, b"x", False, CAP)


# Download


@pytest.fixture
def content(home):
    data = bytes(range(256)) * 40  # 10,240 bytes
    write(os.path.join(home, "data.bin"), data)
    return data


def test_download_answers_a_range_and_the_whole_size(home, content):
    assert download(home, "data.bin", 100, 50) == (content[100:150], len(content), False)


def test_download_eof_when_the_range_reaches_the_end(home, content):
    size = len(content)
    assert download(home, "data.bin", size - 10, 10) == (content[-10:], size, True)
    assert download(home, "data.bin", size - 10, 1000) == (content[-10:], size, True)
    assert download(home, "data.bin", 0, size) == (content, size, True)
    assert download(home, "data.bin", 0, size - 1)[2] is False


def test_download_past_the_end_answers_no_data_and_eof(home, content):
    assert download(home, "data.bin", len(content), 10) == (b"", len(content), True)
    assert download(home, "data.bin", 10 * len(content), 10) == (b"", len(content), True)


def test_download_of_an_empty_file(home):
    write(os.path.join(home, "empty"), b"")
    assert download(home, "empty", 0, 10) == (b"", 0, True)


def test_download_in_chunks_equals_the_file(home, content):
    assert download_all(home, "data.bin", 1000) == (content, len(content))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=5000),
    offset=st.integers(min_value=0, max_value=6000),
    length=st.integers(min_value=1, max_value=MAX_CHUNK),
    chunk=st.integers(min_value=1, max_value=2000),
)
def test_download_matches_slices_of_the_file(home, data, offset, length, chunk):
    upload(home, "random.bin", data, False, CAP)
    piece, size, eof = download(home, "random.bin", offset, length)
    assert piece == data[offset : offset + length]
    assert size == len(data)
    assert eof == (offset + length >= len(data))
    assert download_all(home, "random.bin", chunk) == (data, len(data))


def test_download_of_a_large_file_in_one_mib_chunks(home):
    data = os.urandom(3 * MIB + 17)
    for start in range(0, len(data), MAX_CHUNK):
        upload(home, "big", data[start : start + MAX_CHUNK], True, CAP)
    assert download_all(home, "big", MAX_CHUNK) == (data, len(data))


def test_download_of_a_missing_file(home):
    with pytest.raises(FileNotFound):
        download(home, "nothing", 0, 10)
    with pytest.raises(FileNotFound):
        download(home, "no/such/dir/file", 0, 10)


def test_download_of_a_directory_is_an_invalid_request(home):
    os.mkdir(os.path.join(home, "d"))
    with pytest.raises(InvalidRequest, match="is a directory"):
        download(home, "d", 0, 10)
    with pytest.raises(InvalidRequest, match="is a directory"):
        download(home, ".", 0, 10)


@pytest.mark.parametrize(
    "offset, length", [(-1, 10), (0, 0), (0, -5), (0, MAX_CHUNK + 1), (1 << 64, 10), (True, 10), (0, 1.5)]
)
def test_download_refuses_bad_ranges(home, content, offset, length):
    with pytest.raises(InvalidRequest):
        download(home, "data.bin", offset, length)


def test_download_accepts_a_one_mib_length(home, content):
    assert download(home, "data.bin", 0, MAX_CHUNK)[0] == content


# List


def test_list_files_describes_entries_sorted_by_name(home):
    upload(home, "b.txt", b"12345", False, CAP)
    upload(home, "a/inner", b"x", False, CAP)
    os.symlink("/etc/passwd", os.path.join(home, "c-link"))
    os.mkfifo(os.path.join(home, "d-fifo"))
    os.utime(os.path.join(home, "b.txt"), (1_000_000, 1_234_567.5))
    listing = list_files(home)
    assert [entry["name"] for entry in listing] == ["a", "b.txt", "c-link", "d-fifo"]
    by_name = {entry["name"]: entry for entry in listing}
    assert by_name["a"]["type"] == "dir"
    assert by_name["a"]["mode"] == 0o755
    assert by_name["b.txt"] == {"name": "b.txt", "type": "file", "size": 5, "mode": 0o644, "mtime": 1_234_567.5}
    # lstat: the link itself, not /etc/passwd
    assert by_name["c-link"]["type"] == "link"
    assert by_name["c-link"]["size"] == len("/etc/passwd")
    assert by_name["d-fifo"]["type"] == "other"


def test_list_files_of_a_subdirectory(home):
    upload(home, "sub/dir/x", b"1", False, CAP)
    assert [entry["name"] for entry in list_files(home, "sub/dir")] == ["x"]
    assert [entry["name"] for entry in list_files(home, "./sub//")] == ["dir"]


def test_list_files_of_an_empty_home(home):
    assert list_files(home) == []
    assert list_files(home, "") == []


def test_list_files_of_a_missing_directory(home):
    with pytest.raises(FileNotFound):
        list_files(home, "nothing")


def test_list_files_of_a_file_is_an_invalid_request(home):
    upload(home, "f", b"x", False, CAP)
    with pytest.raises(InvalidRequest, match="not a directory"):
        list_files(home, "f")


def test_list_files_refuses_too_many_entries(home, monkeypatch):
    monkeypatch.setattr(files, "MAX_LIST_ENTRIES", 5)
    for index in range(5):
        upload(home, f"f{index}", b"", False, CAP)
    assert len(list_files(home)) == 5
    upload(home, "f5", b"", False, CAP)
    with pytest.raises(InvalidRequest, match="too many entries"):
        list_files(home)


def test_list_files_limit_is_ten_thousand(home):
    assert files.MAX_LIST_ENTRIES == 10_000


# Attacks: symbolic links


def test_symlink_to_root_at_the_top_is_refused(home, outside):
    os.symlink("/", os.path.join(home, "root"))
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        download(home, "root/etc/passwd", 0, 100)
    with pytest.raises(PathNotAllowed):
        list_files(home, "root")
    with pytest.raises(PathNotAllowed):
        list_files(home, "root/etc")
    os.symlink(outside, os.path.join(home, "out"))
    with pytest.raises(PathNotAllowed):
        upload(home, "out/canary", b"pwned", False, CAP)
    with pytest.raises(PathNotAllowed):
        upload(home, "out/new-file", b"pwned", False, CAP)
    assert read(outside, "canary") == CANARY
    assert os.listdir(outside) == ["canary"]


def test_symlink_in_the_middle_of_a_path_is_refused(home, outside):
    upload(home, "a/b/keep", b"x", False, CAP)
    os.symlink("/", os.path.join(home, "a", "b", "link"))
    os.symlink(outside, os.path.join(home, "a", "b", "out"))
    with pytest.raises(PathNotAllowed):
        download(home, "a/b/link/etc/passwd", 0, 100)
    with pytest.raises(PathNotAllowed):
        upload(home, "a/b/out/canary", b"pwned", False, CAP)
    with pytest.raises(PathNotAllowed):
        upload(home, "a/b/out/deeper/new", b"pwned", False, CAP)
    assert read(outside, "canary") == CANARY
    assert os.listdir(outside) == ["canary"]


def test_relative_symlink_climbing_out_is_refused(home, outside):
    os.symlink("../../outside", os.path.join(home, "up"))
    assert os.path.realpath(os.path.join(home, "up")) == os.path.realpath(outside)
    with pytest.raises(PathNotAllowed):
        download(home, "up/canary", 0, 100)
    with pytest.raises(PathNotAllowed):
        upload(home, "up/canary", b"pwned", True, CAP)
    assert read(outside, "canary") == CANARY


def test_symlink_that_stays_inside_is_refused_too(home):
    upload(home, "real/f", b"inside", False, CAP)
    os.symlink("real", os.path.join(home, "alias"))
    os.symlink("real/f", os.path.join(home, "f-alias"))
    with pytest.raises(PathNotAllowed):
        download(home, "alias/f", 0, 10)
    with pytest.raises(PathNotAllowed):
        download(home, "f-alias", 0, 10)


@pytest.mark.parametrize("append", [False, True])
def test_upload_never_writes_through_a_final_symlink(home, outside, append):
    canary = os.path.join(outside, "canary")
    os.symlink(canary, os.path.join(home, "link"))
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        upload(home, "link", b"pwned", append, CAP)
    assert read(canary) == CANARY
    assert os.readlink(os.path.join(home, "link")) == canary


def test_upload_never_creates_through_a_dangling_symlink(home, outside):
    target = os.path.join(outside, "created-by-agent")
    os.symlink(target, os.path.join(home, "dangling"))
    with pytest.raises(PathNotAllowed):
        upload(home, "dangling", b"pwned", False, CAP)
    assert not os.path.lexists(target)


def test_download_never_reads_through_a_final_symlink(home, outside):
    os.symlink(os.path.join(outside, "canary"), os.path.join(home, "link"))
    os.symlink("/etc/shadow", os.path.join(home, "shadow"))
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        download(home, "link", 0, 100)
    with pytest.raises(PathNotAllowed):
        download(home, "shadow", 0, 100)


def test_a_home_that_is_a_symlink_is_refused(tmp_path, outside):
    os.symlink(outside, tmp_path / "kernel-link")
    with pytest.raises(PathNotAllowed):
        download(str(tmp_path / "kernel-link"), "canary", 0, 100)


def test_a_missing_home_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFound):
        list_files(str(tmp_path / "gone"))


# Attacks: FIFOs, devices, hard links


def test_fifo_is_refused_without_hanging(home):
    os.mkfifo(os.path.join(home, "fifo"))
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(download, home, "fifo", 0, 10)
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(upload, home, "fifo", b"x", False, CAP)
    with pytest.raises(PathNotAllowed):
        finishes(upload, home, "fifo", b"x", True, CAP)


def test_fifo_with_a_reader_is_refused(home):
    fifo = os.path.join(home, "fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(PathNotAllowed):
            finishes(upload, home, "fifo", b"x", False, CAP)
        assert os.read(reader, 10) == b""
    finally:
        os.close(reader)


def test_fifo_swapped_in_after_the_check_is_refused_without_hanging(home, monkeypatch):
    """The fstat after open catches what the lstat before it missed."""
    fifo = os.path.join(home, "f")
    write(fifo, b"regular for now")
    real_open = os.open

    def swapping_open(name, flags, *args, **kwargs):
        if name == "f" and "dir_fd" in kwargs and not flags & os.O_CREAT:
            os.unlink(fifo)
            os.mkfifo(fifo)
            reader = real_open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that O_WRONLY opens
            try:
                return real_open(name, flags, *args, **kwargs)
            finally:
                os.close(reader)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(download, home, "f", 0, 10)
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(upload, home, "f", b"x", False, CAP)


def test_device_node_is_refused(home):
    device = os.path.join(home, "null")
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(download, home, "null", 0, 10)
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        finishes(upload, home, "null", b"x", False, CAP)
    assert [entry["type"] for entry in list_files(home)] == ["other"]


def test_unix_socket_is_refused(home):
    import socket

    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(os.path.join(home, "sock"))
        with pytest.raises(PathNotAllowed):
            finishes(download, home, "sock", 0, 10)
        with pytest.raises(PathNotAllowed):
            finishes(upload, home, "sock", b"x", False, CAP)
    finally:
        server.close()


def test_hard_link_to_a_file_outside_is_never_written(home, outside):
    """
    A hard link cannot be told from the file's own name: reading one is allowed (the kernel
    user could only link a file it may read and write, on the same mount), writing refused.
    """
    canary = os.path.join(outside, "canary")
    os.link(canary, os.path.join(home, "hard"))
    for append in (False, True):
        with pytest.raises(PathNotAllowed, match="hard links"):
            upload(home, "hard", b"pwned", append, CAP)
    assert read(canary) == CANARY
    assert download(home, "hard", 0, 100) == (CANARY, len(CANARY), True)


def test_hard_link_refusal_comes_before_truncation(home):
    upload(home, "f", b"content", False, CAP)
    os.link(os.path.join(home, "f"), os.path.join(home, "g"))
    with pytest.raises(PathNotAllowed):
        upload(home, "f", b"", False, CAP)
    assert read(home, "f") == b"content"


# Errors stay declared; descriptors are closed


def test_a_name_too_long_is_an_invalid_request_everywhere(home):
    for call in (
        lambda: upload(home, "n" * 256, b"x", False, CAP),
        lambda: upload(home, "n" * 256 + "/f", b"x", False, CAP),
        lambda: download(home, "n" * 256, 0, 1),
        lambda: list_files(home, "n" * 256),
    ):
        with pytest.raises(InvalidRequest, match="too long"):
            call()


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS])
def test_unexpected_os_errors_become_invalid_request(home, monkeypatch, code):
    def failing_write(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(InvalidRequest, match=os.strerror(code)):
        upload(home, "f", b"x", False, CAP)


def test_permission_errors_become_invalid_request(home, monkeypatch):
    def refusing_scandir(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.raises(InvalidRequest, match="Permission denied"):
        list_files(home)


def test_no_descriptor_leaks(home, outside):
    upload(home, "a/b/f", b"x", False, CAP)
    os.symlink(outside, os.path.join(home, "a", "out"))
    os.mkfifo(os.path.join(home, "a", "fifo"))
    os.link(os.path.join(home, "a", "b", "f"), os.path.join(home, "a", "hard"))
    before = open_fds()
    calls = [
        lambda: upload(home, "a/b/f", b"y", True, CAP),
        lambda: upload(home, "a/b/g", b"y", False, CAP),
        lambda: upload(home, "a/c/d/e", b"y", False, CAP),
        lambda: upload(home, "a/out/x", b"y", False, CAP),
        lambda: upload(home, "a/fifo", b"y", False, CAP),
        lambda: upload(home, "a/hard", b"y", False, CAP),
        lambda: upload(home, "a/b/f", b"y" * 20, True, 10),
        lambda: upload(home, "a/b/f/x", b"y", False, CAP),
        lambda: download(home, "a/b/f", 0, 10),
        lambda: download(home, "a/b", 0, 10),
        lambda: download(home, "a/missing", 0, 10),
        lambda: download(home, "a/out/canary", 0, 10),
        lambda: list_files(home, "a"),
        lambda: list_files(home, "a/out"),
        lambda: list_files(home, "a/b/f"),
    ]
    for call in calls:
        try:
            call()
        except AgentError:
            pass
    assert open_fds() == before


# Attacks: races


def _exchange_function():
    """``renameat2(RENAME_EXCHANGE)``: swap two names atomically, where libc has it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return None
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a, b):
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), a)

    return exchange


class Swapper(threading.Thread):
    """Keeps swapping ``path`` between what it is and a symbolic link to ``target``."""

    def __init__(self, path, target):
        super().__init__(daemon=True)
        self.path, self.spare = path, path + ".spare"
        os.symlink(target, self.spare)
        self.exchange = _exchange_function()
        self.stopping = threading.Event()
        self.swaps = 0

    def run(self):
        while not self.stopping.is_set():
            try:
                if self.exchange is not None:
                    self.exchange(self.path, self.spare)
                else:
                    parked = self.path + ".parked"
                    os.rename(self.path, parked)
                    os.rename(self.spare, self.path)
                    os.rename(parked, self.spare)
                self.swaps += 1
            except OSError as error:
                if error.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                    raise

    def stop(self):
        self.stopping.set()
        self.join(TIMEOUT)


def outside_state(outside):
    return {
        name: (read(outside, name), os.lstat(os.path.join(outside, name)).st_mtime_ns)
        for name in sorted(os.listdir(outside))
    }


def race(home, outside, swapper, operations, seconds=1.0):
    """Run ``operations`` in a loop while ``swapper`` swaps; count outcomes by kind."""
    before = outside_state(outside)
    outcomes = {}
    swapper.start()
    try:
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if elapsed > seconds and {"ok", "PathNotAllowed"} <= outcomes.keys() or elapsed > 10:
                break
            for operation in operations:
                try:
                    result = operation()
                except AgentError as error:
                    kind = type(error).__name__
                else:
                    kind = "ok"
                    if isinstance(result, tuple):
                        assert CANARY not in result[0], "a download read outside the home"
                    if isinstance(result, list):
                        names = {entry["name"] for entry in result}
                        assert MARKER not in names, "a listing listed outside the home"
                outcomes[kind] = outcomes.get(kind, 0) + 1
    finally:
        swapper.stop()
    assert swapper.swaps > 10
    assert outside_state(outside) == before, "something outside the home changed"
    # Both sides of the swap were hit: the race was real.
    assert outcomes.get("ok", 0) > 0 and outcomes.get("PathNotAllowed", 0) > 0, outcomes
    return outcomes


def test_race_swapping_a_directory_for_a_symlink(home, outside):
    directory = os.path.join(home, "swap")
    upload(home, "swap/canary", b"inside", False, CAP)
    write(os.path.join(outside, MARKER), b"")
    swapper = Swapper(directory, outside)
    operations = [
        lambda: upload(home, "swap/canary", b"pwned", False, CAP),
        lambda: upload(home, "swap/canary", b"+", True, CAP),
        lambda: upload(home, "swap/new-file", b"pwned", False, CAP),
        lambda: upload(home, "swap/deeper/new-file", b"pwned", False, CAP),
        lambda: download(home, "swap/canary", 0, 1000),
        lambda: list_files(home, "swap"),
    ]
    race(home, outside, swapper, operations)
    assert sorted(os.listdir(outside)) == ["canary", MARKER]


def test_race_swapping_a_directory_for_a_symlink_to_etc(home, outside):
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    upload(home, "etc/passwd", b"inside", False, CAP)
    swapper = Swapper(os.path.join(home, "etc"), "/etc")

    def read_passwd():
        data, size, eof = download(home, "etc/passwd", 0, MAX_CHUNK)
        assert data == b"inside", "a download read /etc/passwd"
        return data, size, eof

    def list_etc():
        listing = list_files(home, "etc")
        assert {entry["name"] for entry in listing} <= {"passwd"}, "a listing listed /etc"
        return listing

    race(home, outside, swapper, [read_passwd, list_etc])
    with open("/etc/passwd", "rb") as f:
        assert f.read() == passwd


def test_race_swapping_a_file_for_a_symlink(home, outside):
    upload(home, "target", b"inside", False, CAP)
    swapper = Swapper(os.path.join(home, "target"), os.path.join(outside, "canary"))
    operations = [
        lambda: upload(home, "target", b"pwned", False, CAP),
        lambda: upload(home, "target", b"+", True, CAP),
        lambda: download(home, "target", 0, 1000),
    ]
    race(home, outside, swapper, operations)


# Parents vanishing mid-upload: UploadFile declares PATH_NOT_ALLOWED and FILE_TOO_LARGE,
# not FILE_NOT_FOUND, so whatever the kernel does to the path, an upload answers one of
# those (or the common ones), never FileNotFound.

UPLOAD_ERRORS = (PathNotAllowed, FileTooLarge, InvalidRequest)


def parent_vanishing_at_create(monkeypatch, home, times, replacement=None):
    """
    Before the upload creates its file, the kernel removes the (empty) parent directory
    ``home/sub`` the upload has just opened, and may put ``replacement`` (a symlink target)
    in its place: ``times`` times.
    """
    real_open = os.open
    vanished = []

    def vanishing_open(name, flags, *args, **kwargs):
        if name == "f" and "dir_fd" in kwargs and flags & os.O_CREAT and len(vanished) < times:
            vanished.append(True)
            os.rmdir(os.path.join(home, "sub"))
            if replacement is not None:
                os.symlink(replacement, os.path.join(home, "sub"))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", vanishing_open)
    return vanished


@pytest.mark.parametrize("append", [False, True])
def test_a_parent_removed_mid_upload_is_made_again(home, monkeypatch, append):
    os.mkdir(os.path.join(home, "sub"))
    vanished = parent_vanishing_at_create(monkeypatch, home, times=1)
    assert upload(home, "sub/f", b"data", append, CAP) == 4
    monkeypatch.undo()
    assert vanished
    assert read(home, "sub", "f") == b"data"
    assert os.stat(os.path.join(home, "sub")).st_uid == KERNEL_UID


def test_a_parent_replaced_by_a_symlink_mid_upload_is_path_not_allowed(home, outside, monkeypatch):
    os.mkdir(os.path.join(home, "sub"))
    vanished = parent_vanishing_at_create(monkeypatch, home, times=1, replacement=outside)
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        upload(home, "sub/f", b"pwned", False, CAP)
    monkeypatch.undo()
    assert vanished
    assert sorted(os.listdir(outside)) == ["canary"]


def test_a_parent_that_keeps_vanishing_is_path_not_allowed(home, monkeypatch):
    os.mkdir(os.path.join(home, "sub"))
    vanished = parent_vanishing_at_create(monkeypatch, home, times=10**6)
    with pytest.raises(PathNotAllowed, match="removed or replaced"):
        upload(home, "sub/f", b"x", False, CAP)
    assert 1 < len(vanished) < 10


def test_a_parent_removed_between_its_mkdir_and_its_open_is_made_again(home, monkeypatch):
    real_mkdir = os.mkdir
    made = []

    def mkdir_then_vanish(name, *args, **kwargs):
        real_mkdir(name, *args, **kwargs)
        if name == "new" and "dir_fd" in kwargs and not made:
            made.append(True)
            os.rmdir(os.path.join(home, "new"))

    monkeypatch.setattr(os, "mkdir", mkdir_then_vanish)
    assert upload(home, "new/deeper/f", b"x", False, CAP) == 1
    monkeypatch.undo()
    assert made and read(home, "new", "deeper", "f") == b"x"


def test_a_parent_removed_mid_upload_under_a_deleted_tree(home, monkeypatch):
    # The kernel removes the whole branch after the upload opened its deepest directory.
    os.makedirs(os.path.join(home, "a", "b", "sub"))
    real_open = os.open
    removed = []

    def removing_open(name, flags, *args, **kwargs):
        if name == "f" and "dir_fd" in kwargs and flags & os.O_CREAT and not removed:
            removed.append(True)
            for path in ("a/b/sub", "a/b", "a"):
                os.rmdir(os.path.join(home, path))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", removing_open)
    upload(home, "a/b/sub/f", b"x", False, CAP)
    monkeypatch.undo()
    assert removed and read(home, "a", "b", "sub", "f") == b"x"


def test_an_upload_into_a_missing_home_is_an_invalid_request(tmp_path):
    with pytest.raises(InvalidRequest, match="home directory is missing"):
        upload(str(tmp_path / "gone"), "f", b"x", False, CAP)


def test_uploads_racing_a_parent_removed_and_remade_answer_only_declared_errors(home):
    # The kernel keeps removing and remaking the parent while uploads go on.
    parent = os.path.join(home, "churn")
    os.mkdir(parent)
    stopping = threading.Event()

    def churn():
        while not stopping.is_set():
            try:
                for name in os.listdir(parent):
                    os.unlink(os.path.join(parent, name))
                os.rmdir(parent)
                os.mkdir(parent)
            except OSError:
                pass

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    outcomes = {}
    try:
        for _ in range(2000):
            try:
                upload(home, "churn/f", b"x", False, CAP)
                kind = "ok"
            except AgentError as error:
                assert isinstance(error, UPLOAD_ERRORS), f"undeclared {error!r}"
                kind = type(error).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
    finally:
        stopping.set()
        thread.join(TIMEOUT)
    assert outcomes.get("ok", 0) > 0, outcomes


def test_an_upload_into_a_full_home_is_file_too_large(home, monkeypatch):
    # The home holds at most the kernel's scratch grant; the disk says ENOSPC past it.
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(files.FileTooLarge, match="home is full"):
        upload(home, "big.bin", b"x" * 100, False, 1 << 20)
