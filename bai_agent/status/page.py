"""
The status page (Klein): ``/`` for people, ``/status.json`` for scripts, ``/healthz`` for
supervisors and load balancers, ``/metrics`` for Prometheus. No route ever shows a
traceback: failures are logged and answered with a plain 500.

``/`` is rendered on the server and complete without JavaScript (it then reloads itself
every few seconds); with JavaScript, a small inline script (``assets.SCRIPT``) fetches
``/status.json`` instead and redraws the sections in place, with the same markup. The page
loads nothing from elsewhere, which its Content-Security-Policy enforces.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from bai_agent.protocol.events import KERNEL_TERMINATED
from bai_agent.stats import readings as stats_readings
from bai_agent.status import readings
from bai_agent.status.assets import CHART_HEIGHT, CHART_WIDTH, REFRESH_SECONDS, SCRIPT, STYLE
from bai_agent.status.metrics import AgentMetrics
from bai_agent.status.sources import StatusSources

if TYPE_CHECKING:
    from bai_agent.health import AgentHealth
    from bai_agent.kernels.journal import AgentEvent, EventJournal

log = Logger()


class StatusPage:
    """The routes, over ``StatusSources``; ``metrics`` renders ``/metrics``."""

    app = Klein()

    def __init__(self, sources: StatusSources, metrics: AgentMetrics) -> None:
        self.sources = sources
        self.metrics_page = metrics

    def snapshot(self) -> dict[str, Any]:
        sources = self.sources
        etcd = sources.etcd
        docker = sources.docker
        heartbeat_delay, heartbeat_delay_max = readings.heartbeat_delays(etcd)
        journal_entries, journal_last_seq = readings.journal_size(sources.journal)
        kernels = sources.kernels.records(reveal=False)  # the page is unauthenticated: no tokens
        node = stats_readings.node_sample(sources.stats)
        problems = sources.health.problems()
        return {
            "agent": sources.info(),
            "healthy": not problems,
            "problems": problems,
            "uptime": sources.report.uptime(),
            "etcd": {
                "address": sources.config.etcd_addr,
                "namespace": sources.config.namespace,
                "registered": bool(etcd.registered),
                "last_error": etcd.last_error,
                "last_heartbeat_at": etcd.last_heartbeat_at,
                "heartbeat_interval": etcd.heartbeat_interval,
                "heartbeat_delay": heartbeat_delay,
                "heartbeat_delay_max": heartbeat_delay_max,
            },
            "docker": {
                "host": sources.config.docker_host,
                "healthy": docker.healthy,
                "last_error": docker.last_error,
                "api_version": docker.api_version,
                "daemon_version": docker.daemon_version,
            },
            "images": [image.to_json() for image in docker.images],
            "kernels": kernels,
            "pulls": sources.kernels.pulls_in_progress(),
            "pool": sources.kernels.pool_state(),
            "now": sources.clock.seconds(),
            "connections": len(sources.connections),
            "events": recent_events(sources.health, sources.journal),
            "journal": {"entries": journal_entries, "last_seq": journal_last_seq},
            "stats": {
                "node": node,
                "kernels": stats_readings.kernel_samples(sources.stats),
                "sample_seconds": stats_readings.sample_seconds(sources.stats),
            },
            "gpus": gpu_devices(node, kernels),
            "history": sources.history.to_json(sources.clock.seconds()),
        }

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"Cache-Control", b"no-store")
        return render_html(self.snapshot()).encode("utf-8")

    @app.route("/status.json", methods=["GET", "HEAD"])
    def status_json(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        snapshot = strict_json_value(self.snapshot())
        return json.dumps(snapshot, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        problems = self.sources.health.problems()
        if problems:
            request.setResponseCode(503)
            return ("unhealthy\n" + "".join(f"{problem}\n" for problem in problems)).encode("utf-8")
        pool_problem = self.sources.kernels.pool_state().get("problem")
        if pool_problem:
            # Healthy all the same: creates are served cold.
            return f"ok\nwarm pool: {pool_problem}\n".encode()
        return b"ok\n"

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics_page.render()

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        error = failure.value
        if isinstance(error, HTTPException):  # 404, 405: not a failure of the agent
            request.setResponseCode(error.code)
            return f"{error.code} {error.name}\n".encode()
        log.failure("status page {path} failed", failure, path=request.path)
        request.setResponseCode(500)
        return b"internal error; see the agent log\n"


#: Inline style and script only; data from the agent itself; nothing from anywhere else.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)

RECENT_EVENTS = 30


def strict_json_value(value: object) -> object:
    """``value`` with every NaN or infinity replaced by None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def recent_events(health: AgentHealth, journal: EventJournal) -> list[dict[str, Any]]:
    """Health changes and the journal's last events, oldest first."""
    events: list[dict[str, Any]] = [{"ts": ts, "message": message} for ts, message in health.recent_events]
    if journal.last_seq:
        tail = journal.since(max(0, journal.last_seq - RECENT_EVENTS))
        events += [{"ts": event.ts, "message": describe_event(event)} for event in tail]
    return sorted(events, key=lambda event: event["ts"])[-RECENT_EVENTS:]


def describe_event(event: AgentEvent) -> str:
    text = f"#{event.seq} {event.type}"
    if event.kernel_id:
        text += f" {event.kernel_id}"
    if event.type == KERNEL_TERMINATED:
        text += f" ({event.data.get('reason')}, exit code {event.data.get('exit_code')})"
    return text


def gpu_devices(node: dict[str, Any] | None, kernels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Every NVIDIA device the page shows: those in the machine's last sample, plus any granted
    to a kernel but missing from it; each with ``kernel_id``, the kernel holding it (or None).
    """
    holders: dict[int, str] = {}
    for kernel in kernels:
        for index in readings.kernel_gpus(kernel):
            holders[index] = kernel["kernel_id"]
    devices = {gpu["index"]: dict(gpu) for gpu in (node["gpus"] if node else ())}
    for index in holders:
        devices.setdefault(
            index,
            {
                "index": index,
                "uuid": "",
                "name": "",
                "util_percent": None,
                "mem_used": None,
                "mem_total": None,
                "error": None,
            },
        )
    for index, device in devices.items():
        device["kernel_id"] = holders.get(index)
    return [devices[index] for index in sorted(devices)]


# -- rendering; assets.SCRIPT has the same functions in JavaScript, keep the two alike ----


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    return f"{minutes}m {seconds}s"


def _rounded(value: float, digits: int) -> float:
    """
    ``value`` rounded half up at ``digits`` decimals, as the script's ``rounded``: Python's
    format and JavaScript's ``toFixed`` round a tie (1.25 GiB, 0.125 cores) differently,
    but never a number already rounded so.
    """
    scale = 10**digits
    return math.floor(value * scale + 0.5) / scale


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            amount = value / size
            return f"{_rounded(amount, 1):.1f} {unit}" if amount < 10 else f"{_rounded(amount, 0):.0f} {unit}"
    return f"{_rounded(value, 0):.0f} B"


def _cores(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{_rounded(value, 2):.2f}".rstrip("0").rstrip(".") or "0"


def _percent(value: float | None) -> str:
    # Halves round up, as JavaScript's toFixed(0) does (Python's format rounds them to even).
    return "-" if value is None else f"{math.floor(value + 0.5)}%"


def _share(part: float | None, whole: float | None) -> float:
    """``part`` of ``whole`` in percent, 0..100; 0 when either is unknown."""
    if part is None or not whole:
        return 0.0
    return max(0.0, min(100.0, 100.0 * part / whole))


def _health(ok: bool, text: str) -> str:
    css = "ok" if ok else "bad"
    return f'<span class="pill {css}">{_e(text)}</span>'


def _bar(allocated: float | None, measured: float | None, title: str = "") -> str:
    """
    A bar: ``allocated`` (percent) as the light band, ``measured`` (percent) as the dark
    strip beneath it; either may be None (not known: no band).
    """
    parts = []
    if allocated is not None:
        parts.append(f'<span class="alloc" style="width:{allocated:.1f}%"></span>')
    if measured is not None:
        parts.append(f'<span class="use" style="width:{measured:.1f}%"></span>')
    return f'<div class="bar" title="{_e(title)}">{"".join(parts)}</div>'


def _none(columns: int, text: str) -> str:
    return f'<tr><td colspan="{columns}" class="none">{_e(text)}</td></tr>'


def render_summary(snap: dict[str, Any]) -> str:
    agent, etcd = snap["agent"], snap["etcd"]
    overall = _health(snap["healthy"], "healthy" if snap["healthy"] else "unhealthy")
    problems = "".join(f"<li>{_e(problem)}</li>" for problem in snap["problems"])
    return (
        f"<h1>bai-agent <code>{_e(agent['agent_id'])}</code> {overall}</h1>"
        f'<div class="meta">version {_e(agent["version"])} &middot; namespace {_e(etcd["namespace"])}'
        f" &middot; up {_e(_duration(snap['uptime']))} &middot; AMP {_e(agent['amp_endpoint'] or '-')}"
        f" &middot; {_e(snap['connections'])} manager connection(s) &middot; {_e(agent['kernels'])} kernel(s)"
        f" &middot; as of {_e(_time(snap['now']))}</div>"
        + (f'<ul class="problems">{problems}</ul>' if problems else "")
    )


def render_health(snap: dict[str, Any]) -> str:
    etcd, docker, journal, stats = snap["etcd"], snap["docker"], snap["journal"], snap["stats"]
    if etcd["registered"]:
        etcd_detail = etcd["address"]
    else:
        etcd_detail = f"{etcd['last_error'] or 'connecting'} · {etcd['address']}"
    if docker["healthy"]:
        docker_detail = f"API {docker['api_version']}, Docker {docker['daemon_version']} · {docker['host']}"
    else:
        docker_detail = f"{docker['last_error'] or 'connecting'} · {docker['host']}"
    interval, delay, delay_max = etcd["heartbeat_interval"], etcd["heartbeat_delay"], etcd["heartbeat_delay_max"]
    sampled = stats["node"]["sampled_at"] if stats["node"] else None
    sampling = (
        "not sampled yet"
        if sampled is None
        else f"last {_time(sampled)}"
        + (f", took {stats['sample_seconds'] * 1000:.1f} ms CPU" if stats["sample_seconds"] is not None else "")
    )
    late = ' class="warn"' if delay >= interval > 0 else ""
    return (
        "<table>"
        "<tr><th>etcd</th>"
        f"<td>{_health(etcd['registered'], 'registered' if etcd['registered'] else 'not registered')}</td>"
        f'<td class="meta">{_e(etcd_detail)}</td></tr>'
        f'<tr><th>heartbeat</th><td class="num"><span{late}>{delay:.3f} s late</span> (max {delay_max:.3f} s)</td>'
        f'<td class="meta">every {interval:g} s, last {_e(_time(etcd["last_heartbeat_at"]))}</td></tr>'
        f"<tr><th>Docker</th><td>{_health(docker['healthy'], 'reachable' if docker['healthy'] else 'unreachable')}</td>"
        f'<td class="meta">{_e(docker_detail)}</td></tr>'
        f'<tr><th>events</th><td class="num">{_e(journal["entries"])} kept</td>'
        f'<td class="meta">last seq {_e(journal["last_seq"])}</td></tr>'
        f'<tr><th>statistics</th><td colspan="2" class="meta">{_e(sampling)}</td></tr>'
        "</table>"
    )


def _resource_row(label: str, bar: str, text: str, extra: str = "") -> str:
    return f'<tr><th>{label}</th><td>{bar}{extra}</td><td class="num">{text}</td></tr>'


def render_resources(snap: dict[str, Any]) -> str:
    resources = snap["agent"]["resources"]
    node = snap["stats"]["node"]
    rows = []
    cpu = resources.get("cpu", {"capacity": 0, "used": 0})
    cpu_count = node["cpu"]["count"] if node else None
    cpu_percent = node["cpu"]["percent"] if node else None
    text = f"{_e(_cores(cpu['used']))} of {_e(_cores(cpu['capacity']))} cores allocated"
    if cpu_percent is not None:
        busy = cpu_percent / 100 * cpu_count if cpu_count else None
        text += f"<br>{_e(_percent(cpu_percent))} busy" + (
            f" ({_e(_cores(busy))} of {_e(cpu_count)} cores)" if busy is not None else ""
        )
    cores = ""
    if node and node["cpu"]["per_core"]:
        cores = (
            '<div class="cores">'
            + "".join(
                f'<span title="core {index}: {_e(_percent(percent))}">'
                f'<i style="height:{_share(percent, 100):.0f}%"></i></span>'
                for index, percent in enumerate(node["cpu"]["per_core"])
            )
            + "</div>"
        )
    rows.append(
        _resource_row(
            "CPU",
            _bar(_share(cpu["used"], cpu["capacity"]), None if cpu_percent is None else _share(cpu_percent, 100)),
            text,
            cores,
        )
    )
    mem = resources.get("mem", {"capacity": 0, "used": 0})
    text = f"{_e(_bytes(mem['used']))} of {_e(_bytes(mem['capacity']))} allocated"
    measured = None
    if node and node["mem"]["total"]:
        measured = _share(node["mem"]["used"], node["mem"]["total"])
        text += f"<br>{_e(_bytes(node['mem']['used']))} of {_e(_bytes(node['mem']['total']))} in use"
    rows.append(_resource_row("memory", _bar(_share(mem["used"], mem["capacity"]), measured), text))
    if node and node["disk"]["total"]:
        disk = node["disk"]
        rows.append(
            _resource_row(
                "scratch disk",
                _bar(None, _share(disk["used"], disk["total"])),
                f"{_e(_bytes(disk['used']))} of {_e(_bytes(disk['total']))} used"
                f'<br><span class="meta path">{_e(disk["path"] or "")}</span>',
            )
        )
    gpus = resources.get("cuda.device", {"capacity": 0, "used": 0})
    if gpus["capacity"] or snap["gpus"]:
        rows.append(
            _resource_row(
                "GPUs",
                _bar(_share(gpus["used"], gpus["capacity"]), None),
                f"{_e(_cores(gpus['used']))} of {_e(_cores(gpus['capacity']))} allocated",
            )
        )
    for gpu in snap["gpus"]:
        holder = f"kernel {gpu['kernel_id']}" if gpu["kernel_id"] else "free"
        if gpu["error"]:
            text = f'<span class="warn">{_e(gpu["error"])}</span> &middot; {_e(holder)}'
        else:
            text = f"{_e(_percent(gpu['util_percent']))} busy &middot; {_e(holder)}"
            if gpu["mem_total"]:
                text += f"<br>{_e(_bytes(gpu['mem_used']))} of {_e(_bytes(gpu['mem_total']))} memory"
        rows.append(
            _resource_row(
                f'GPU {_e(gpu["index"])}<br><span class="meta">{_e(gpu["name"])}</span>',
                _bar(
                    100.0 if gpu["kernel_id"] else 0.0,
                    None if gpu["util_percent"] is None else _share(gpu["util_percent"], 100),
                ),
                text,
            )
        )
    return (
        '<table class="resources">' + "".join(rows) + "</table>"
        '<div class="legend"><span class="alloc"></span> allocated to kernels'
        f' <span class="use"></span> measured use{"" if node else " (not sampled yet)"}</div>'
    )


def _service_base(service: dict[str, Any]) -> str:
    host = str(service["host"])
    return f"http://{'[' + host + ']' if ':' in host else host}:{service['port']}/"


def render_services(kernel: dict[str, Any]) -> str:
    """A kernel's services: an HTTP one links to its relay (the token stays in the manager's answer)."""
    parts = []
    for service in kernel.get("services") or ():
        name = _e(service["name"])
        if service.get("port") is None:
            parts.append(f'{name} <span class="meta">{_e(service["status"])}</span>')
        elif service.get("protocol") == "http":
            base = _service_base(service)
            parts.append(f'<a href="{_e(base)}">{name}</a> <span class="meta">{_e(base)}</span>')
        else:
            parts.append(f'{name} <span class="meta">{_e(service["host"])}:{_e(service["port"])}</span>')
    return "<br>".join(parts) or "-"


def render_kernels(snap: dict[str, Any]) -> str:
    now = snap["now"]
    samples = snap["stats"]["kernels"]
    rows = []
    for kernel in snap["kernels"]:
        sample = samples.get(kernel["kernel_id"], {})
        resources = kernel.get("resources") or {}
        granted_cpu = resources.get("cpu")
        granted_mem = resources.get("mem")
        used_cores = sample["cpu_util"] / 100 if "cpu_util" in sample else None
        cpuset = f' <span class="meta">cores {_e(resources["cpuset"])}</span>' if resources.get("cpuset") else ""
        mem_used = sample.get("mem_bytes")
        gpus = ", ".join(str(device) for device in readings.kernel_gpus(kernel)) or "-"
        status = kernel["status"]
        rows.append(
            f"<tr><td><code>{_e(kernel['kernel_id'])}</code></td><td>{_e(kernel['image'])}</td>"
            f'<td class="status-{_e(status)}">{_e(status)}</td>'
            f'<td class="num">{_e(_duration(now - kernel["created_at"]))}</td>'
            f'<td class="num">{_e(_duration(now - kernel["last_used"]))}</td>'
            f"<td>{_bar(None, None if used_cores is None else _share(used_cores, granted_cpu))}</td>"
            f'<td class="num">{_e(_cores(used_cores))} of {_e(_cores(granted_cpu))}{cpuset}</td>'
            f"<td>{_bar(None, None if mem_used is None else _share(mem_used, granted_mem))}</td>"
            f'<td class="num">{_e(_bytes(mem_used))} of {_e(_bytes(granted_mem))}</td>'
            f'<td class="num">{_e(gpus)}</td>'
            f'<td class="num">{_e(_bytes(sample.get("scratch_bytes")))}</td>'
            f'<td class="services">{render_services(kernel)}</td></tr>'
        )
    return (
        '<table class="kernels"><tr><th>kernel</th><th>image</th><th>status</th><th>age</th><th>idle</th>'
        '<th colspan="2">CPU (cores used of granted)</th><th colspan="2">memory (used of granted)</th>'
        "<th>GPUs</th><th>scratch</th><th>services</th></tr>"
        + ("".join(rows) or _none(12, "no kernels"))
        + "</table>"
        + render_pulls(snap)
        + render_pool(snap)
    )


def render_pool(snap: dict[str, Any]) -> str:
    """The warm pool's containers, apart from the kernels (nothing without a pool)."""
    pool = snap.get("pool") or {}
    rows = [
        f"<tr><td>warm pool {_e(image)}</td><td>{_bar(None, _share(state['ready'], state['target']))}</td>"
        f'<td class="num">{_e(state["ready"])} ready of {_e(state["target"])}</td>'
        f'<td class="num">{_e(state["filling"])} filling</td></tr>'
        for image, state in sorted((pool.get("images") or {}).items())
    ]
    if not rows:
        return ""
    refill = pool.get("last_refill_seconds")
    summary = f"{_e(pool.get('claims', 0))} claims, {_e(pool.get('misses', 0))} misses" + (
        f", last refill {_e(math.floor(refill * 1000 + 0.5))} ms" if isinstance(refill, (int, float)) else ""
    )
    problem = f'<div class="warn">{_e(pool["problem"])}</div>' if pool.get("problem") else ""
    return f'<table class="pool">{"".join(rows)}</table><div class="meta">warm pool: {summary}</div>{problem}'


def render_pulls(snap: dict[str, Any]) -> str:
    """The image pulls in progress, under the kernels (nothing when there are none)."""
    rows = []
    for pull in snap.get("pulls") or ():
        total = pull["bytes_total"]
        done = _bytes(pull["bytes_done"]) + (f" of {_bytes(total)}" if total else "")
        rows.append(
            f"<tr><td>pulling {_e(pull['image'])}</td><td>{_bar(None, _share(pull['bytes_done'], total))}</td>"
            f'<td class="num">{_e(done)}</td><td class="num">{_e(_duration(pull["elapsed"]))}</td>'
            f'<td class="num">{_e(pull["waiting"])} waiting</td></tr>'
        )
    return '<table class="pulls">' + "".join(rows) + "</table>" if rows else ""


# -- the last hour: small charts, drawn the same by the script (assets.SCRIPT's chart) ----


def chart_segments(
    times: list[float], values: list[float | None], start: float, span: float, top: float
) -> list[list[tuple[int, int]]]:
    """
    The points of a chart in its viewBox (``CHART_WIDTH`` x ``CHART_HEIGHT``, y down), as
    runs between missing readings: ``start`` at the left edge, ``start + span`` at the
    right, 0 at the bottom and ``top`` at the top. Integers, computed with the same
    floating-point operations as the script, so both draw the same path.
    """
    segments: list[list[tuple[int, int]]] = []
    segment: list[tuple[int, int]] = []
    for at, value in zip(times, values):
        if value is None:
            if segment:
                segments.append(segment)
                segment = []
            continue
        x = math.floor((at - start) / span * CHART_WIDTH + 0.5)
        y = CHART_HEIGHT - math.floor(min(max(value / top, 0.0), 1.0) * CHART_HEIGHT + 0.5)
        segment.append((x, y))
    if segment:
        segments.append(segment)
    return segments


def _current(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return known[-1] if known else None


def _peak(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def _top(limit: float | None, peak: float | None) -> float:
    """The value at a chart's top: the limit (capacity, grant), or the peak when higher; 1 when neither."""
    return max(limit or 0, peak or 0) or 1


def render_chart(
    label: str,
    series: dict[str, Any],
    name: str,
    snap: dict[str, Any],
    fmt: Any,
    limit: float | None = None,
    of: str = "",
) -> str:
    """One chart: ``label``, the current value and the peak (``fmt`` formats them), the line and its area."""
    span = snap["history"]["span"]
    values = series[name]
    peak = _peak(values)
    segments = chart_segments(series["times"], values, snap["now"] - span, span, _top(limit, peak))
    # A run of one reading is a line of no length: its round caps show it as a dot.
    line = "".join(
        "M" + "L".join(f"{x},{y}" for x, y in (segment if len(segment) > 1 else segment * 2)) for segment in segments
    )
    area = "".join(
        f"M{segment[0][0]},{CHART_HEIGHT}"
        + "".join(f"L{x},{y}" for x, y in segment)
        + f"L{segment[-1][0]},{CHART_HEIGHT}Z"
        for segment in segments
    )
    return (
        f'<div class="chart"><div class="chart-head"><span class="chart-label">{_e(label)}</span> '
        f'<span class="now">{_e(fmt(_current(values)))}</span> '
        f'<span class="meta">peak {_e(fmt(peak))}{_e(of)}</span></div>'
        f'<svg class="spark" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" preserveAspectRatio="none" '
        f'role="img" aria-label="{_e(label)}, last hour">'
        f'<path class="area" d="{area}"></path><path class="line" d="{line}"></path></svg></div>'
    )


def render_history(snap: dict[str, Any]) -> str:
    history = snap["history"]
    node = history["node"]
    mem_total, disk_total = node["mem_total"], node["disk_total"]
    charts = (
        render_chart("CPU", node, "cpu", snap, _percent, 100)
        + render_chart("memory", node, "mem", snap, _bytes, mem_total, f" of {_bytes(mem_total)}")
        + render_chart("scratch disk", node, "disk", snap, _bytes, disk_total, f" of {_bytes(disk_total)}")
    )
    rows = []
    for kernel in snap["kernels"]:
        series = history["kernels"].get(kernel["kernel_id"])
        if series is None:
            continue
        resources = kernel.get("resources") or {}
        cpu, mem = resources.get("cpu"), resources.get("mem")
        rows.append(
            f"<tr><td><code>{_e(kernel['kernel_id'])}</code></td>"
            f"<td>{render_chart('cores', series, 'cpu', snap, _cores, cpu, f' of {_cores(cpu)}')}</td>"
            f"<td>{render_chart('memory', series, 'mem', snap, _bytes, mem, f' of {_bytes(mem)}')}</td></tr>"
        )
    untracked = history["untracked_kernels"]
    note = (
        f"the last {history['span'] / 60:g} minutes: the machine every {history['interval']:g} s,"
        f" kernels the most of every {history['kernel_step']:g} s"
    )
    if untracked:
        note += f"; {untracked} kernel(s) without history (more than the agent keeps)"
    return (
        f'<div class="charts">{charts}</div>'
        '<table class="history"><tr><th>kernel</th><th>CPU</th><th>memory</th></tr>'
        + ("".join(rows) or _none(3, "no kernel history yet"))
        + f'</table><div class="legend">{_e(note)}</div>'
    )


def render_images(snap: dict[str, Any]) -> str:
    rows = [
        f"<tr><td>{_e(image['name'])}</td><td>{_e(image['runtime_type'])}</td>"
        f"<td><code>{_e(image['id'][:19])}</code></td></tr>"
        for image in snap["images"]
    ]
    return (
        "<table><tr><th>name</th><th>runtime</th><th>id</th></tr>"
        + ("".join(rows) or _none(3, "no kernel images (labelled ai.backend.kernelspec=1)"))
        + "</table>"
    )


def render_events(snap: dict[str, Any]) -> str:
    rows = [
        f'<tr><td class="num when">{_e(_time(event["ts"]))}</td><td>{_e(event["message"])}</td></tr>'
        for event in reversed(snap["events"])
    ]
    return "<table>" + ("".join(rows) or _none(2, "no events yet")) + "</table>"


SECTIONS = (
    ("summary", render_summary),
    ("health", render_health),
    ("resources", render_resources),
    ("history", render_history),
    ("kernels", render_kernels),
    ("images", render_images),
    ("events", render_events),
)


def render_html(snap: dict[str, Any]) -> str:
    parts = {name: render(snap) for name, render in SECTIONS}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bai-agent {_e(snap["agent"]["agent_id"])}</title>
<style>{STYLE}</style></head>
<body>
<header id="summary">{parts["summary"]}</header>
<div id="refresh" class="meta">reloads every {REFRESH_SECONDS} s</div>
<div class="columns">
<section><h2>Health</h2><div id="health">{parts["health"]}</div></section>
<section><h2>Resources</h2><div id="resources">{parts["resources"]}</div></section>
</div>
<section><h2>Kernels</h2><div id="kernels">{parts["kernels"]}</div></section>
<section><h2>Last hour</h2><div id="history">{parts["history"]}</div></section>
<div class="columns">
<section><h2>Recent events</h2><div id="events">{parts["events"]}</div></section>
<section><h2>Kernel images</h2><div id="images">{parts["images"]}</div></section>
</div>
<script>{SCRIPT}</script>
</body></html>
"""
