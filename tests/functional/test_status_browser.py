"""
The status page in a real browser (headless Chromium): what an operator sees of a real agent
with real kernels, and that the page's script draws what the server draws.

Each test keeps a screenshot in ``artifacts/`` under the repository root (or in
``$BAI_ARTIFACTS_DIR``). Chromium runs with a fresh profile and without background
networking, in a session of its own, killed by its pid (as a process group) when it hangs.
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections import defaultdict
from html.parser import HTMLParser

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.server import Site

from bai_agent.protocol.client import AgentClient
from bai_agent.status.page import render_html
from bai_agent.testing.waiting import sleep
from tests.functional.agent_process import REPO, running_agent
from tests.functional.test_kernels_real import IMAGE
from tests.unit.test_status_metrics import BusyAgent

pytestmark = pytest.mark.functional

CHROMIUM_TIMEOUT = 90
SECTIONS = ("summary", "health", "resources", "history", "kernels", "images", "events", "refresh")


def artifacts_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("BAI_ARTIFACTS_DIR") or os.path.join(REPO, "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (Debian package chromium; scripts/install-deps installs it)"
    return path


def chromium(*args, timeout=CHROMIUM_TIMEOUT, window="1280,900") -> bytes:
    """Run headless Chromium with ``args``; its stdout. Blocking: call it in a thread."""
    profile = tempfile.mkdtemp(prefix="bai-chromium-")
    argv = [
        chromium_path(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={window}",
        *args,
    ]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium did not finish in {timeout}s: {argv}") from None
    finally:
        try:  # helpers (zygote, renderer) that outlive the browser, if any
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    assert process.returncode == 0, f"chromium exited with {process.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out


def in_thread(reactor, f, *args, **kwargs):
    # The reactor keeps running meanwhile: the AMP connection answers the agent's pings.
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


def dom(reactor, url):
    """The page's DOM after its script ran (``--virtual-time-budget`` lets it fetch and draw)."""
    return in_thread(reactor, chromium, "--virtual-time-budget=5000", "--dump-dom", url)


def screenshot(reactor, url, name, budget=5000, window="1280,900"):
    path = artifacts_dir() / name
    if path.exists():
        path.unlink()
    d = in_thread(reactor, chromium, f"--virtual-time-budget={budget}", f"--screenshot={path}", url, window=window)
    d.addCallback(lambda _: path)
    return d


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


class Visible(HTMLParser):
    """
    What a person reads on the page, per section (the elements with the ids in SECTIONS):
    its text, its table rows' texts, its bars (``(row, band, width percent)``) and its
    charts (``(label, area path, line path)``).
    """

    HIDDEN = {"script", "style", "title", "noscript"}
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self, markup):
        super().__init__(convert_charrefs=True)
        self.stack = []  # (tag, section id or None, hidden)
        self.text = defaultdict(list)
        self.rows = defaultdict(list)
        self.bars = defaultdict(list)
        self.charts = defaultdict(list)
        self.row = None
        self.feed(markup)
        self.close()

    def _section(self):
        for _, section, _ in reversed(self.stack):
            if section:
                return section
        return None

    def _hidden(self):
        return any(hidden for _, _, hidden in self.stack)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.VOID:
            if tag == "br":
                self.handle_data(" ")
            return
        section = attrs.get("id") if attrs.get("id") in SECTIONS else None
        self.stack.append((tag, section, tag in self.HIDDEN))
        if tag == "tr":
            self.row = []
        band = attrs.get("class")
        width = re.match(r"width:\s*([\d.]+)%", attrs.get("style") or "")
        if tag == "span" and band in ("alloc", "use") and width:  # a bar's band, not the legend's
            self.bars[self._section()].append((len(self.rows[self._section()]), band, float(width.group(1))))
        if tag == "svg" and band == "spark":
            self.charts[self._section()].append([attrs.get("aria-label")])
        if tag == "path" and band in ("area", "line"):
            self.charts[self._section()][-1].append(attrs.get("d"))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:
            top, _, _ = self.stack.pop()
            if top == tag:
                break
        if tag == "tr" and self.row is not None:
            self.rows[self._section()].append(" ".join(" ".join(self.row).split()))
            self.row = None

    def handle_data(self, data):
        if self._hidden():
            return
        self.text[self._section()].append(data)
        if self.row is not None:
            self.row.append(data)

    def section_text(self, name) -> str:
        return " ".join(" ".join(self.text[name]).split())

    def row_starting(self, name, prefix) -> str:
        matching = [row for row in self.rows[name] if row.startswith(prefix)]
        assert matching, f"no row starting {prefix!r} in {name}: {self.rows[name]}"
        return matching[0]


@pytest.fixture
def agent(tmp_path, etcd_server, docker_host):
    with running_agent(tmp_path, etcd_server.addr, "agent-browser") as process:
        yield process


def status(agent) -> dict:
    code, body = agent.http("/status.json")
    assert code == 200, body
    return json.loads(body)


def burning(snapshot) -> bool:
    return snapshot["stats"]["kernels"].get("burner-2", {}).get("cpu_util", 0) > 0


@pytest_twisted.inlineCallbacks
def test_operator_sees_identity_health_kernels_and_resource_bars(agent, reactor):
    secret = agent.secret_path.read_text().strip()
    client = yield AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret)
    created = []
    try:
        for kernel_id in ("web-1", "burner-2"):
            yield client.create_kernel(kernel_id, IMAGE, {"cpu": 0.25, "mem": "128m"})
            created.append(kernel_id)
        answer = yield client.execute("burner-2", "query", "while True: pass", options={"flush_timeout": 0.5})
        assert answer["status"] == "continued"
        # Two rounds of the statistics collector (the first has no CPU rate yet) make a
        # better picture; nothing below depends on them.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not burning(status(agent)):
            yield sleep(reactor, 0.5)

        url = f"http://127.0.0.1:{agent.http_port}/"
        markup = (yield dom(reactor, url)).decode()
        shot = yield screenshot(reactor, url, "status-page.png")
        snapshot = status(agent)
    finally:
        for kernel_id in created:
            yield client.destroy_kernel(kernel_id)
        client.close()

    page = Visible(markup)
    # The script ran: it fetched status.json from the agent and redrew the page.
    assert page.section_text("refresh").startswith("live: updated"), page.section_text("refresh")
    summary = page.section_text("summary")
    assert summary.startswith("bai-agent agent-browser healthy"), summary
    assert "2 kernel(s)" in summary
    assert page.row_starting("health", "etcd").startswith("etcd registered")
    assert page.row_starting("health", "Docker").startswith("Docker reachable API")
    for kernel_id in ("web-1", "burner-2"):
        row = page.row_starting("kernels", kernel_id)
        assert row.startswith(f"{kernel_id} {IMAGE} running "), row
        assert " of 0.25 " in row and " of 128 MiB " in row, row
    assert page.row_starting("images", IMAGE)
    # The last hour: the machine's three charts and two for each kernel, with the readings so far.
    charts = page.charts["history"]
    assert [chart[0] for chart in charts] == ["CPU, last hour", "memory, last hour", "scratch disk, last hour"] + [
        "cores, last hour",
        "memory, last hour",
    ] * 2
    assert all(line_points(line) for _, _, line in charts), charts
    assert page.row_starting("history", "web-1") and page.row_starting("history", "burner-2")

    # Resource bars: allocation (two kernels of a quarter core and 128 MiB) against capacity.
    resources = snapshot["agent"]["resources"]
    cpu_row = page.row_starting("resources", "CPU")
    assert cpu_row.startswith("CPU 0.5 of "), cpu_row
    memory_row = page.row_starting("resources", "memory")
    assert memory_row.startswith("memory 256 MiB of "), memory_row
    rows = page.rows["resources"]
    allocation = {rows[index].split()[0]: width for index, band, width in page.bars["resources"] if band == "alloc"}
    assert allocation["CPU"] == pytest.approx(100 * 0.5 / resources["cpu"]["capacity"], abs=0.1)
    assert allocation["memory"] == pytest.approx(100 * (256 << 20) / resources["mem"]["capacity"], abs=0.1)
    assert png_size(shot) == (1280, 900)


@pytest_twisted.inlineCallbacks
def test_the_script_draws_what_the_server_draws(tmp_path, reactor):
    busy = BusyAgent(tmp_path)
    page = busy.state.status_page()
    port = reactor.listenTCP(0, Site(page.app.resource()), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/"
        # The server's page without its script: what a browser without JavaScript shows.
        static = tmp_path / "static.html"
        static.write_text(re.sub(r"<script>.*?</script>", "", render_html(page.snapshot()), flags=re.S))
        server_drawn = Visible((yield in_thread(reactor, chromium, "--dump-dom", static.as_uri())).decode())
        script_drawn = Visible((yield dom(reactor, url)).decode())
        snapshot = json.loads((yield in_thread(reactor, fetch, url + "status.json")))
        yield screenshot(reactor, url, "status-page-sample.png", window="1280,1500")
    finally:
        yield port.stopListening()
        busy.close()

    assert script_drawn.section_text("refresh").startswith("live: updated")
    assert server_drawn.section_text("refresh") == "reloads every 5 s"
    for name in SECTIONS[:-1]:
        assert script_drawn.section_text(name) == server_drawn.section_text(name), name
        assert script_drawn.rows[name] == server_drawn.rows[name], name
        assert script_drawn.bars[name] == server_drawn.bars[name], name
        assert script_drawn.charts[name] == server_drawn.charts[name], name
    # The sample has something in every section, so that the comparison means something.
    assert script_drawn.row_starting("kernels", "k-train")
    assert script_drawn.row_starting("resources", "GPU 1").endswith("GPU is lost · free")
    assert len(script_drawn.bars["resources"]) == 9
    assert_charts_match_the_json(script_drawn, snapshot)


def fetch(url) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def line_points(d):
    """The points of a chart's line path, ``M x,y L x,y ... M ...``: a list per run."""
    return [[tuple(int(n) for n in point.split(",")) for point in run.split("L")] for run in d.split("M")[1:]]


def assert_charts_match_the_json(page, snapshot):
    """
    Each chart the browser drew has one point per reading of its series in ``/status.json``,
    where the reading puts it (worked out here, not with the page's code), broken where a
    reading is missing; and its text shows the series' last value and its peak.
    """
    history, now = snapshot["history"], snapshot["now"]
    span, node = history["span"], history["node"]
    kernels = {kernel["kernel_id"]: kernel for kernel in snapshot["kernels"]}
    expected = [("CPU, last hour", node, "cpu", 100), ("memory, last hour", node, "mem", node["mem_total"])]
    expected.append(("scratch disk, last hour", node, "disk", node["disk_total"]))
    for kernel_id in (kernel["kernel_id"] for kernel in snapshot["kernels"]):
        series = history["kernels"].get(kernel_id)
        if series is not None:
            resources = kernels[kernel_id]["resources"]
            expected.append(("cores, last hour", series, "cpu", resources["cpu"]))
            expected.append(("memory, last hour", series, "mem", resources["mem"]))
    charts = page.charts["history"]
    assert [chart[0] for chart in charts] == [label for label, *_ in expected]
    assert len(expected) == 7  # the machine's three, and two for each of the sample's two kernels
    for (label, series, name, limit), (_, area, line) in zip(expected, charts):
        values = series[name]
        known = [value for value in values if value is not None]
        top = max(limit or 0, max(known)) or 1
        runs, run = [], []
        for at, value in zip(series["times"], values):
            if value is None:
                runs, run = (runs + [run] if run else runs), []
                continue
            run.append(((at - (now - span)) / span * 300, 48 - min(value / top, 1.0) * 48))
        runs = runs + [run] if run else runs
        # A run of one reading is drawn as a line of no length (a dot): its point twice.
        drawn = [points[:1] if len(points) == 2 and points[0] == points[1] else points for points in line_points(line)]
        assert [len(points) for points in drawn] == [len(points) for points in runs], label
        for drawn_run, run in zip(drawn, runs):
            for (x, y), (want_x, want_y) in zip(drawn_run, run):
                assert abs(x - want_x) <= 0.5 + 1e-9 and abs(y - want_y) <= 0.5 + 1e-9, (label, x, y, want_x, want_y)
        assert area.count("Z") == len(runs), label
    cpu = [value for value in node["cpu"] if value is not None]
    assert f"CPU {math.floor(cpu[-1] + 0.5)}% peak {math.floor(max(cpu) + 0.5)}%" in page.section_text("history")
    assert any(run for run in line_points(charts[0][2])[1:]), "the sample's gap in the CPU readings breaks the line"
