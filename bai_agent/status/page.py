"""
The status page (Klein): ``/`` for people, ``/status.json`` for scripts, ``/healthz`` for
supervisors and load balancers, ``/metrics`` for Prometheus. No route ever shows a
traceback: failures are logged and answered with a plain 500.
"""

import datetime
import html
import json

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException

log = Logger()


class StatusPage:
    app = Klein()

    def __init__(self, state):
        self.state = state

    def snapshot(self) -> dict:
        state = self.state
        etcd = state.etcd
        docker = state.docker
        return {
            "agent": state.record(),
            "healthy": not state.problems(),
            "problems": state.problems(),
            "uptime": state.uptime(),
            "etcd": {
                "address": state.config.etcd_addr,
                "namespace": state.config.namespace,
                "registered": bool(etcd and etcd.registered),
                "last_error": etcd.last_error if etcd else None,
                "last_heartbeat_at": etcd.last_heartbeat_at if etcd else None,
                "heartbeat_interval": state.heartbeat_interval(),
            },
            "docker": {
                "host": state.config.docker_host,
                "healthy": docker.healthy,
                "last_error": docker.last_error,
                "api_version": docker.api_version,
                "daemon_version": docker.daemon_version,
            },
            "images": [image.to_json() for image in docker.images],
            "kernels": state.kernels.records() if state.kernels is not None else [],
            "now": state.clock.seconds(),
            "connections": len(state.connections),
            "events": recent_events(state),
        }

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return render_html(self.snapshot()).encode("utf-8")

    @app.route("/status.json", methods=["GET", "HEAD"])
    def status_json(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.snapshot(), indent=2, sort_keys=True).encode("utf-8")

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        problems = self.state.problems()
        if problems:
            request.setResponseCode(503)
            return ("unhealthy\n" + "".join(f"{problem}\n" for problem in problems)).encode("utf-8")
        return b"ok\n"

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request):
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.state.metrics.render()

    @app.handle_errors(Exception)
    def failed(self, request, failure):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if failure.check(HTTPException):  # 404, 405: not a failure of the agent
            request.setResponseCode(failure.value.code)
            return f"{failure.value.code} {failure.value.name}\n".encode("utf-8")
        log.failure("status page {path} failed", failure, path=request.path)
        request.setResponseCode(500)
        return b"internal error; see the agent log\n"


RECENT_EVENTS = 30


def recent_events(state) -> list:
    """Health changes and the journal's last events, oldest first."""
    events = [{"ts": ts, "message": message} for ts, message in state.recent_events]
    if state.journal is not None and state.journal.last_seq:
        tail = state.journal.since(max(0, state.journal.last_seq - RECENT_EVENTS))
        events += [{"ts": event.ts, "message": describe_event(event)} for event in tail]
    return sorted(events, key=lambda event: event["ts"])[-RECENT_EVENTS:]


def describe_event(event) -> str:
    text = f"#{event.seq} {event.type}"
    if event.kernel_id:
        text += f" {event.kernel_id}"
    if event.type == "kernel-terminated":
        text += f" ({event.data.get('reason')}, exit code {event.data.get('exit_code')})"
    return text


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _time(ts) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    return f"{minutes}m {seconds}s"


def _amount(slot, value) -> str:
    if slot == "mem":
        if value < 1 << 30:
            return f"{value / (1 << 20):.0f} MiB"
        return f"{value / (1 << 30):.1f} GiB"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.2f}"
    return str(int(value))


def _health(ok: bool, text: str) -> str:
    css = "ok" if ok else "bad"
    return f'<span class="pill {css}">{_e(text)}</span>'


def render_html(snap: dict) -> str:
    agent = snap["agent"]
    etcd = snap["etcd"]
    docker = snap["docker"]
    resource_rows = []
    for slot, amounts in agent["resources"].items():
        capacity, used = amounts["capacity"], amounts["used"]
        share = 0 if not capacity else min(100, 100 * used / capacity)
        resource_rows.append(
            f"<tr><th>{_e(slot)}</th><td><div class='bar'><div style='width:{share:.0f}%'></div></div></td>"
            f"<td>{_e(_amount(slot, used))} of {_e(_amount(slot, capacity))}</td></tr>"
        )
    image_rows = [
        f"<tr><td>{_e(image['name'])}</td><td>{_e(image['runtime_type'])}</td>"
        f"<td><code>{_e(image['id'][:19])}</code></td></tr>"
        for image in snap["images"]
    ] or ["<tr><td colspan='3' class='none'>no kernel images (labelled ai.backend.kernelspec=1)</td></tr>"]
    kernel_rows = [
        f"<tr><td><code>{_e(kernel['kernel_id'])}</code></td><td>{_e(kernel['image'])}</td>"
        f"<td>{_e(kernel['status'])}</td><td>{_e(_duration(snap['now'] - kernel['created_at']))}</td>"
        f"<td>{_e(_duration(snap['now'] - kernel['last_used']))}</td>"
        f"<td>{_e(_amount('cpu', kernel['resources'].get('cpu', 0)))}"
        f"{' (cores ' + _e(kernel['resources']['cpuset']) + ')' if kernel['resources'].get('cpuset') else ''}</td>"
        f"<td>{_e(_amount('mem', kernel['resources'].get('mem', 0)))}</td></tr>"
        for kernel in snap["kernels"]
    ] or ["<tr><td colspan='7' class='none'>no kernels</td></tr>"]
    event_rows = [
        f"<tr><td>{_e(_time(event['ts']))}</td><td>{_e(event['message'])}</td></tr>"
        for event in reversed(snap["events"])
    ] or ["<tr><td colspan='2' class='none'>no events yet</td></tr>"]
    etcd_text = "registered" if etcd["registered"] else f"not registered: {etcd['last_error'] or 'connecting'}"
    docker_text = (
        f"API {docker['api_version']}, Docker {docker['daemon_version']}"
        if docker["healthy"]
        else f"unreachable: {docker['last_error'] or 'connecting'}"
    )
    overall = _health(snap["healthy"], "healthy" if snap["healthy"] else "unhealthy")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<title>bai-agent {_e(agent['agent_id'])}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }}
h2 {{ font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; min-width: 40em; }}
th, td {{ text-align: left; padding: .25em .8em .25em 0; vertical-align: middle; }}
.pill {{ padding: .1em .6em; border-radius: 1em; color: white; font-weight: 600; }}
.ok {{ background: #2e7d32; }} .bad {{ background: #c62828; }}
.bar {{ width: 20em; height: .9em; background: #e0e0e0; border-radius: .3em; overflow: hidden; }}
.bar div {{ height: 100%; background: #1565c0; }}
.none {{ color: #888; font-style: italic; }}
.meta {{ color: #555; }}
code {{ font-size: .9em; }}
</style></head>
<body>
<h1>bai-agent <code>{_e(agent['agent_id'])}</code> {overall}</h1>
<div class="meta">version {_e(agent['version'])} &middot; namespace {_e(etcd['namespace'])}
&middot; up {_e(_duration(snap['uptime']))} &middot; AMP {_e(agent['amp_endpoint'] or '-')}
&middot; {snap['connections']} manager connection(s)</div>
<h2>Health</h2>
<table>
<tr><th>etcd</th><td>{_health(etcd['registered'], etcd_text)}</td>
<td class="meta">{_e(etcd['address'])}, heartbeat every {etcd['heartbeat_interval']:g} s, last {_e(_time(etcd['last_heartbeat_at']))}</td></tr>
<tr><th>Docker</th><td>{_health(docker['healthy'], docker_text)}</td><td class="meta">{_e(docker['host'])}</td></tr>
</table>
<h2>Resources</h2>
<table>{''.join(resource_rows)}</table>
<h2>Kernel images</h2>
<table><tr><th>name</th><th>runtime</th><th>id</th></tr>{''.join(image_rows)}</table>
<h2>Kernels</h2>
<table><tr><th>id</th><th>image</th><th>status</th><th>age</th><th>idle</th><th>CPU</th><th>memory</th></tr>{''.join(kernel_rows)}</table>
<h2>Recent events</h2>
<table>{''.join(event_rows)}</table>
</body></html>
"""
