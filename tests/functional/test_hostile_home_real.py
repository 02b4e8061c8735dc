"""
A real agent against what user code in a real kernel does to its own home: trees deeper
than any recursion with symlinks out of them and locked directories (the kernel must still
end: DestroyKernel answers, kernel-terminated is journaled, the home and the grant go), and
directories kept swapping for symlinks out of the home while the agent sizes it.
"""

import os
import time

import pytest
import pytest_twisted

from bai_agent.node.trees import remove_tree
from bai_agent.testing.waiting import sleep, wait_until
from tests.functional.executing import IMAGE, run_to_end, text

pytestmark = pytest.mark.functional


MIB = 1 << 20
SUBDIRS = 200

# Two chains (3,000 and 20,000 levels), each with symlinks to / and to a host directory at
# the bottom, and directories the kernel user locked (modes 000 and 0500).
DEEP_HOME = """
import os
def chain(top, depth):
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY)
    for level in range(depth):
        os.mkdir("d", dir_fd=fd)
        if level % 1000 == 0:
            os.close(os.open(f"f{level}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.symlink("/", "root", dir_fd=fd)
    os.symlink(OUTSIDE, "outside", dir_fd=fd)
    os.close(fd)
os.chdir("/home/work")
chain("a", 3000)
chain("b", 20000)
os.symlink("/", "root")
os.symlink(OUTSIDE, "outside")
os.makedirs("locked/inner/deeper")
open("locked/inner/f", "w").close()
os.chmod("locked/inner", 0)
os.chmod("locked", 0o500)
print("made", os.getuid())
"""

# Ten directories of 200 subdirectories each, every one of the ten swapped for a symlink
# to a host directory (which has subdirectories of the same names) and back, about every
# millisecond, in a process of its own that outlives the Execute. A walk that listed a
# directory and opens its subdirectories later, by path, follows the symlink.
SWAPPER = """
import os, time
os.chdir("/home/work")
for i in range(10):
    for k in range(SUBDIRS):
        os.makedirs(f"d{i}/s{k}")
    os.symlink(TARGET, f"l{i}")
os.symlink("/", "root")
with open("stable.bin", "wb") as stable:  # what stands still, and must be counted
    os.posix_fallocate(stable.fileno(), 0, 4 << 20)
open("swapping", "w").close()
def spin(seconds):
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass
while True:
    for i in range(10):
        try:
            os.rename(f"d{i}", f"r{i}")
            os.rename(f"l{i}", f"d{i}")
        except OSError:
            pass
    spin(0.001)
    for i in range(10):
        try:
            os.rename(f"d{i}", f"l{i}")
            os.rename(f"r{i}", f"d{i}")
        except OSError:
            pass
    spin(0.001)
"""

START_SWAPPER = """
import subprocess, sys, os, time
subprocess.Popen([sys.executable, "-c", SWAPPER], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists("/home/work/swapping"):
    time.sleep(0.01)
print("swapping")
"""


@pytest_twisted.inlineCallbacks
def test_a_kernel_whose_home_is_20000_deep_with_links_out_ends_and_frees_everything(client, agent, reactor, tmp_path):
    outside = tmp_path / "host-dir"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("keep")
    events = []
    client.set_event_handler(events.append)
    yield client.subscribe(0)
    home = agent.scratch_root / "deep"
    yield client.create_kernel("deep", IMAGE, {"cpu": 0.5, "mem": "128m"})
    try:
        console, _ = yield run_to_end(client, "deep", "query", DEEP_HOME.replace("OUTSIDE", repr(str(outside))))
        assert text(console).strip() == "made 1000", console
        assert (home / "a").is_dir()
        answer = yield client.destroy_kernel("deep")
        assert answer["kernel_id"] == "deep"
        yield wait_until(
            reactor,
            lambda: any(e["type"] == "kernel-terminated" and e["kernel_id"] == "deep" for e in events),
            15,
            "kernel-terminated of the deep kernel",
        )
        assert not home.exists()
        assert (outside / "sub" / "keep.txt").read_text() == "keep"
        assert (yield client.list_kernels()) == []
        info = yield client.get_agent_info()
        assert info["kernels"] == 0
        assert info["resources"]["cpu"]["used"] == 0 and info["resources"]["mem"]["used"] == 0
        # The id is free, and the new kernel's home is a fresh, empty one.
        yield client.create_kernel("deep", IMAGE, {"cpu": 0.5, "mem": "128m"})
        assert (yield client.list_files("deep")) == []
        yield client.destroy_kernel("deep")
    finally:
        # What a failed removal left must not reach pytest's own clean-up of old tmp
        # dirs, whose rmtree would recurse (in every later session).
        remove_tree(str(home))


@pytest_twisted.inlineCallbacks
def test_a_directory_kept_swapping_for_a_symlink_out_is_never_sized(client, agent, reactor, tmp_path):
    # The symlinks lead to a host directory whose subdirectories hold 1 GiB (one file,
    # allocated so that du counts it, hard-linked in each): a walk that follows them
    # completes and shows it. (A walk led to / itself would read the host for ever and
    # show nothing until it completed.)
    host = tmp_path / "host-data"
    host.mkdir()
    with open(host / "big", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 30)
    for k in range(SUBDIRS):
        (host / f"s{k}").mkdir()
        os.link(host / "big", host / f"s{k}" / "big")
    swapper = SWAPPER.replace("TARGET", repr(str(host))).replace("SUBDIRS", str(SUBDIRS))
    try:
        yield client.create_kernel("swap", IMAGE, {"cpu": 1, "mem": "128m"})
        console, _ = yield run_to_end(client, "swap", "query", START_SWAPPER.replace("SWAPPER", repr(swapper)))
        assert text(console).strip() == "swapping", console
        samples = []
        deadline = time.monotonic() + 40
        # Rounds of sampling (one every 5 s, each a walk of the home) while the swaps go on.
        while len({sample["sampled_at"] for sample in samples}) < 4 and time.monotonic() < deadline:
            sample = yield client.get_kernel_stats("swap")
            samples.append(sample)
            assert sample["scratch_bytes"] < 100 * MIB, sample
            yield sleep(reactor, 0.5)
        assert len({sample["sampled_at"] for sample in samples}) >= 4, samples
        # The home was sized all the same: its 4 MiB file that stands still, and its
        # directories as far as they did (how many did is a matter of timing).
        assert max(sample["scratch_bytes"] for sample in samples) > MIB, samples
        yield client.destroy_kernel("swap")
    finally:
        remove_tree(str(host))  # pytest keeps tmp dirs of the last runs: not a GiB each
