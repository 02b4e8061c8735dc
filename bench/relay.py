"""
How fast a kernel's service comes through the agent's relay, and whether a download through
it slows the agent's other work.

    .venv/bin/python bench/relay.py [--megabytes 64] [--downloads 3] [--runs 200]

Needs the data-science image (``scripts/build-kernel-image bai-kernel/python-sci:3.11``).
Starts its own etcd and a real agent (kernels without a network), creates one kernel of the
image, starts its Jupyter (``StartService``) and writes a file of ``--megabytes`` MB of
random bytes into the kernel's home. Then, in one run:

- relayed: ``GET /files/...`` of that file from Jupyter through the agent's relay (the host
  port of the answer), ``--downloads`` times, by a separate process;
- direct: the same request on the runner's service socket in the kernel's run directory
  (what the agent's relay connects to: the runner and Jupyter, without the agent), as many
  times;
- Execute: the round trip of ``print(1)`` (query mode) ``--runs`` times with nothing else
  going on, then as many times while relayed downloads run back to back, then as many
  while direct downloads do (the same load on Jupyter, the runner and the machine's
  cores, without the agent's relay).

Prints MB/s of both downloads and their ratio, and the Execute p50/p95 idle and during
each kind of download, with the ratios. Targets: relayed at least half the direct
throughput; Execute p50 during relayed downloads at most 1.5x during direct ones (what
the relay costs the agent's other work: it must not stall the agent's reactor).
Everything it made is removed at the end.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import inlineCallbacks  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from bai_agent.kernels.workspace import kernel_key  # noqa: E402
from bai_agent.testing.docker_cli import agent_containers, remove_containers  # noqa: E402
from bench.harness import BenchAgent, percentile  # noqa: E402

IMAGE = "bai-kernel/python-sci:3.11"
KERNEL_ID = "bench-relay"
RESOURCES = {"cpu": 1, "mem": "1g"}
FILE = "bench-relay.bin"

# The downloader, run as its own process so that its reading never shares a GIL with the
# bench's reactor: ``download.py URL|unix:PATH:URLPATH`` prints bytes and seconds.
DOWNLOADER = r"""
import http.client, socket, sys, time
target = sys.argv[1]
class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=300)
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)
if target.startswith("unix:"):
    _, path, url = target.split(":", 2)
    connection = UnixConnection(path)
else:
    rest = target.split("://", 1)[1]
    hostport, url = rest.split("/", 1)
    url = "/" + url
    host, port = hostport.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
started = time.perf_counter()
connection.request("GET", url)
response = connection.getresponse()
total = 0
while True:
    chunk = response.read(1 << 20)
    if not chunk:
        break
    total += len(chunk)
elapsed = time.perf_counter() - started
if response.status != 200:
    sys.exit(f"HTTP {response.status}")
print(total, elapsed)
"""


def download(target):
    """(bytes, seconds) of one download in a separate process."""
    done = subprocess.run([sys.executable, "-c", DOWNLOADER, target], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"download of {target} failed: {done.stderr.strip()}")
    size, seconds = done.stdout.split()
    return int(size), float(seconds)


def throughput(samples):
    """MB/s of the median download."""
    rates = sorted(size / seconds / 1e6 for size, seconds in samples)
    return rates[len(rates) // 2]


@inlineCallbacks
def round_trips(client, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        yield client.execute(KERNEL_ID, "query", "print(1)")
        times.append(time.perf_counter() - started)
    return times


@inlineCallbacks
def during_downloads(client, target, runs):
    """Execute round trips while downloads of ``target`` run back to back; and how many ran."""
    busy = {"stop": False, "downloads": 0}

    def keep_downloading():
        while not busy["stop"]:
            download(target)
            busy["downloads"] += 1

    downloading = deferToThread(keep_downloading)
    time.sleep(0.5)  # the first download is under way
    times = yield round_trips(client, runs)
    busy["stop"] = True
    yield downloading
    return times, busy["downloads"]


@inlineCallbacks
def run(reactor, args):
    bench = BenchAgent(agent_id=f"bench-relay-{os.getpid()}")
    try:
        bench.start()
        client = yield bench.connect(reactor)
        yield client.create_kernel(KERNEL_ID, IMAGE, RESOURCES)
        endpoint = yield client.start_service(KERNEL_ID, "jupyter", {"timeout": 120})
        query = endpoint["url"].split("?", 1)[1]
        size = args.megabytes << 20
        yield client.execute(
            KERNEL_ID, "query", f"import os\nwith open({FILE!r}, 'wb') as f: f.write(os.urandom({size}))\n"
        )
        relayed = f"http://{endpoint['host']}:{endpoint['port']}/files/{FILE}?{query}"
        socket_path = os.path.join(
            bench.agent.state_dir, "kernels", kernel_key(KERNEL_ID), "run", "service-jupyter.sock"
        )
        direct = f"unix:{socket_path}:/files/{FILE}?{query}"
        yield deferToThread(download, relayed)  # warm: Jupyter's first read of the file
        relayed_samples, direct_samples = [], []
        for _ in range(args.downloads):  # interleaved, so that both see the same machine
            relayed_samples.append((yield deferToThread(download, relayed)))
            direct_samples.append((yield deferToThread(download, direct)))
        assert all(size_read == size for size_read, _ in relayed_samples + direct_samples)

        idle = yield round_trips(client, args.runs)
        during, relayed_count = yield during_downloads(client, relayed, args.runs)
        during_direct, direct_count = yield during_downloads(client, direct, args.runs)

        relayed_rate, direct_rate = throughput(relayed_samples), throughput(direct_samples)
        idle_p50, during_p50 = percentile(idle, 0.5), percentile(during, 0.5)
        print(f"file: {args.megabytes} MB from Jupyter in kernel {KERNEL_ID} ({IMAGE}, no kernel network)")
        print(f"relayed (agent relay + runner + Jupyter): {relayed_rate:8.1f} MB/s (median of {args.downloads})")
        print(f"direct  (runner's socket + Jupyter):      {direct_rate:8.1f} MB/s (median of {args.downloads})")
        print(f"relayed / direct: {relayed_rate / direct_rate:.2f}  (target: at least 0.50)")
        print(
            f"Execute idle:            p50 {idle_p50 * 1e3:6.2f} ms  p95 {percentile(idle, 0.95) * 1e3:6.2f} ms"
            f"  ({args.runs} runs)"
        )
        during_direct_p50 = percentile(during_direct, 0.5)
        print(
            f"Execute during relayed downloads: p50 {during_p50 * 1e3:6.2f} ms"
            f"  p95 {percentile(during, 0.95) * 1e3:6.2f} ms  ({args.runs} runs, {relayed_count} downloads meanwhile)"
        )
        print(
            f"Execute during direct downloads:  p50 {during_direct_p50 * 1e3:6.2f} ms"
            f"  p95 {percentile(during_direct, 0.95) * 1e3:6.2f} ms"
            f"  ({args.runs} runs, {direct_count} downloads meanwhile)"
        )
        print(f"during relayed / idle (p50): {during_p50 / idle_p50:.2f}")
        print(
            f"during relayed / during direct (p50): {during_p50 / during_direct_p50:.2f}"
            "  (target: at most 1.50: what the relay itself costs the agent's other work)"
        )
        yield client.destroy_kernel(KERNEL_ID)
        client.close()
    finally:
        remove_containers(agent_containers(bench.agent_id))
        bench.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--downloads", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    react(run, [args])


if __name__ == "__main__":
    main()
