"""
The status page's inline style and script (``page.render_html`` puts both in the page: it
loads nothing else).

``SCRIPT`` redraws the page's sections from ``/status.json`` every ``REFRESH_SECONDS``. Its
render functions are ``page.py``'s, rewritten in JavaScript and producing the same markup:
a change to one belongs in the other. Everything from the agent goes through ``esc`` (or
is a number that the script formats itself) before it reaches ``innerHTML``.
"""

REFRESH_SECONDS = 5
#: The viewBox of the charts of the last hour (page.render_chart); the page scales them.
CHART_WIDTH = 300
CHART_HEIGHT = 48

STYLE = """
:root { --fg: #1d2430; --muted: #5f6b7a; --line: #dde2e8; --bg: #f6f7f9; --card: #fff;
        --alloc: #b9d3f3; --use: #1f5fbf; --ok: #2e7d32; --bad: #c62828; --warn: #b26a00; }
* { box-sizing: border-box; }
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; padding: 14px 20px;
       color: var(--fg); background: var(--bg); }
h1 { font-size: 20px; margin: 0 0 2px; display: flex; align-items: center; gap: .5em; }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
     margin: 0 0 6px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
          margin-top: 12px; overflow-x: auto; }
.columns { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.25fr); gap: 12px; }
.columns > section { margin-top: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 10px 4px 0; vertical-align: middle; border-top: 1px solid var(--line); }
tr:first-child > th, tr:first-child > td { border-top: none; }
th { font-weight: 600; white-space: nowrap; }
.kernels th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
td.when { width: 1%; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
.pill { padding: 1px 8px; border-radius: 10px; color: #fff; font-weight: 600; font-size: 12px;
        white-space: nowrap; }
.ok { background: var(--ok); } .bad { background: var(--bad); }
.warn { color: var(--warn); font-weight: 600; }
.meta { color: var(--muted); }
#refresh { font-size: 11px; margin-top: 2px; }
#refresh.stale { color: var(--bad); font-weight: 600; }
.problems { margin: 6px 0 0; padding: 6px 10px 6px 26px; background: #fdecea; color: var(--bad);
            border-radius: 4px; font-weight: 600; }
.bar { position: relative; width: 100%; min-width: 120px; height: 14px; background: #e9edf2;
       border-radius: 3px; overflow: hidden; }
.bar .alloc { position: absolute; left: 0; top: 0; height: 100%; background: var(--alloc); }
.bar .use { position: absolute; left: 0; bottom: 0; height: 6px; background: var(--use); }
.resources td:nth-child(2) { width: 45%; }
.path { white-space: normal; overflow-wrap: anywhere; }
.kernels .bar { min-width: 70px; }
.cores { display: flex; gap: 2px; height: 16px; margin-top: 3px; }
.cores span { flex: 1; max-width: 14px; background: #e9edf2; position: relative; border-radius: 2px;
              overflow: hidden; }
.cores i { position: absolute; left: 0; right: 0; bottom: 0; background: var(--use); }
.legend { margin-top: 6px; font-size: 11px; color: var(--muted); }
.legend span { display: inline-block; width: 14px; height: 8px; margin-left: 8px; vertical-align: middle; }
.legend .alloc { background: var(--alloc); } .legend .use { background: var(--use); }
.none { color: var(--muted); font-style: italic; }
.charts { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 12px; margin-bottom: 8px; }
.chart-head { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.chart-label { font-weight: 600; }
.chart .now { font-variant-numeric: tabular-nums; font-weight: 600; }
.spark { display: block; width: 100%; height: 44px; background: #f3f5f8; border-bottom: 1px solid var(--line);
         border-radius: 3px; }
.spark .line { fill: none; stroke: var(--use); stroke-width: 1.5; vector-effect: non-scaling-stroke;
               stroke-linejoin: round; stroke-linecap: round; }
.spark .area { fill: var(--alloc); opacity: .55; }
.history td { width: 40%; } .history td:first-child { width: 20%; }
.history .spark { height: 32px; }
.status-running { color: var(--ok); font-weight: 600; }
.status-terminated, .status-terminating { color: var(--bad); }
.status-creating, .status-restarting { color: var(--warn); }
@media (max-width: 900px) { .columns { grid-template-columns: 1fr; } }
"""

# %-formatted (``%(refresh_ms)d``, ``%%``): with str.format, every brace of the script
# would need doubling.
SCRIPT = r"""
"use strict";
(function () {
  var REFRESH_MS = %(refresh_ms)d;
  function esc(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#x27;");
  }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function time(ts) {
    if (!isNum(ts)) return "-";
    return new Date(ts * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }
  function duration(s) {
    s = Math.max(0, Math.floor(s));
    var d = Math.floor(s / 86400); s -= d * 86400;
    var h = Math.floor(s / 3600); s -= h * 3600;
    var m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + m + "m " + s + "s";
    return m + "m " + s + "s";
  }
  // Half up, as page._rounded: toFixed and Python's format round ties differently.
  function rounded(v, digits) {
    var scale = Math.pow(10, digits);
    return Math.floor(v * scale + 0.5) / scale;
  }
  function bytes(v) {
    if (!isNum(v)) return "-";
    var units = [["GiB", 1073741824], ["MiB", 1048576], ["KiB", 1024]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) >= units[i][1]) {
        var a = v / units[i][1];
        return (a < 10 ? rounded(a, 1).toFixed(1) : rounded(a, 0).toFixed(0)) + " " + units[i][0];
      }
    }
    return rounded(v, 0).toFixed(0) + " B";
  }
  function cores(v) {
    if (!isNum(v)) return "-";
    return rounded(v, 2).toFixed(2).replace(/0+$/, "").replace(/\.$/, "") || "0";
  }
  function percent(v) { return isNum(v) ? v.toFixed(0) + "%%" : "-"; }
  function share(part, whole) {
    if (!isNum(part) || !whole) return 0;
    return Math.max(0, Math.min(100, 100 * part / whole));
  }
  function health(ok, text) {
    return '<span class="pill ' + (ok ? "ok" : "bad") + '">' + esc(text) + "</span>";
  }
  function bar(allocated, measured, title) {
    var parts = "";
    if (allocated !== null) parts += '<span class="alloc" style="width:' + allocated.toFixed(1) + '%%"></span>';
    if (measured !== null) parts += '<span class="use" style="width:' + measured.toFixed(1) + '%%"></span>';
    return '<div class="bar" title="' + esc(title || "") + '">' + parts + "</div>";
  }
  function none(columns, text) {
    return '<tr><td colspan="' + columns + '" class="none">' + esc(text) + "</td></tr>";
  }
  function kernelGpus(kernel) {
    var devices = (kernel.resources || {})["cuda.device"];
    return Array.isArray(devices) ? devices.filter(function (d) { return Number.isInteger(d); }) : [];
  }

  function summary(snap) {
    var agent = snap.agent, etcd = snap.etcd;
    var problems = snap.problems.map(function (p) { return "<li>" + esc(p) + "</li>"; }).join("");
    return "<h1>bai-agent <code>" + esc(agent.agent_id) + "</code> " +
      health(snap.healthy, snap.healthy ? "healthy" : "unhealthy") + "</h1>" +
      '<div class="meta">version ' + esc(agent.version) + " &middot; namespace " + esc(etcd.namespace) +
      " &middot; up " + esc(duration(snap.uptime)) + " &middot; AMP " + esc(agent.amp_endpoint || "-") +
      " &middot; " + esc(snap.connections) + " manager connection(s) &middot; " + esc(agent.kernels) +
      " kernel(s) &middot; as of " + esc(time(snap.now)) + "</div>" +
      (problems ? '<ul class="problems">' + problems + "</ul>" : "");
  }

  function healthSection(snap) {
    var etcd = snap.etcd, docker = snap.docker, journal = snap.journal, stats = snap.stats;
    var etcdDetail = etcd.registered ? etcd.address : (etcd.last_error || "connecting") + " \u00b7 " + etcd.address;
    var dockerDetail = (docker.healthy ? "API " + docker.api_version + ", Docker " + docker.daemon_version
      : docker.last_error || "connecting") + " \u00b7 " + docker.host;
    var sampled = stats.node ? stats.node.sampled_at : null;
    var sampling = !isNum(sampled) ? "not sampled yet" : "last " + time(sampled) +
      (isNum(stats.sample_seconds) ? ", took " + (stats.sample_seconds * 1000).toFixed(1) + " ms CPU" : "");
    var interval = Number(etcd.heartbeat_interval), delay = Number(etcd.heartbeat_delay);
    var late = delay >= interval && interval > 0 ? ' class="warn"' : "";
    return "<table>" +
      "<tr><th>etcd</th><td>" + health(etcd.registered, etcd.registered ? "registered" : "not registered") +
      '</td><td class="meta">' + esc(etcdDetail) + "</td></tr>" +
      '<tr><th>heartbeat</th><td class="num"><span' + late + ">" + esc(delay.toFixed(3)) + " s late</span> (max " +
      esc(Number(etcd.heartbeat_delay_max).toFixed(3)) + ' s)</td><td class="meta">every ' + esc(interval) +
      " s, last " + esc(time(etcd.last_heartbeat_at)) + "</td></tr>" +
      "<tr><th>Docker</th><td>" + health(docker.healthy, docker.healthy ? "reachable" : "unreachable") +
      '</td><td class="meta">' + esc(dockerDetail) + "</td></tr>" +
      '<tr><th>events</th><td class="num">' + esc(journal.entries) + ' kept</td><td class="meta">last seq ' +
      esc(journal.last_seq) + "</td></tr>" +
      '<tr><th>statistics</th><td colspan="2" class="meta">' + esc(sampling) + "</td></tr></table>";
  }

  function row(label, barHtml, text, extra) {
    return "<tr><th>" + label + "</th><td>" + barHtml + (extra || "") + '</td><td class="num">' + text + "</td></tr>";
  }

  function resources(snap) {
    var res = snap.agent.resources, node = snap.stats.node, rows = [];
    var cpu = res.cpu || {capacity: 0, used: 0};
    var cpuCount = node ? node.cpu.count : null, cpuPercent = node ? node.cpu.percent : null;
    var text = esc(cores(cpu.used)) + " of " + esc(cores(cpu.capacity)) + " cores allocated";
    if (isNum(cpuPercent)) {
      var busy = cpuCount ? cpuPercent / 100 * cpuCount : null;
      text += "<br>" + esc(percent(cpuPercent)) + " busy" +
        (busy !== null ? " (" + esc(cores(busy)) + " of " + esc(cpuCount) + " cores)" : "");
    }
    var coreBars = "";
    if (node && node.cpu.per_core.length) {
      coreBars = '<div class="cores">' + node.cpu.per_core.map(function (p, i) {
        return '<span title="core ' + i + ": " + esc(percent(p)) + '"><i style="height:' +
          share(p, 100).toFixed(0) + '%%"></i></span>';
      }).join("") + "</div>";
    }
    rows.push(row("CPU", bar(share(cpu.used, cpu.capacity), isNum(cpuPercent) ? share(cpuPercent, 100) : null),
      text, coreBars));
    var mem = res.mem || {capacity: 0, used: 0};
    text = esc(bytes(mem.used)) + " of " + esc(bytes(mem.capacity)) + " allocated";
    var measured = null;
    if (node && node.mem.total) {
      measured = share(node.mem.used, node.mem.total);
      text += "<br>" + esc(bytes(node.mem.used)) + " of " + esc(bytes(node.mem.total)) + " in use";
    }
    rows.push(row("memory", bar(share(mem.used, mem.capacity), measured), text));
    if (node && node.disk.total) {
      var disk = node.disk;
      rows.push(row("scratch disk", bar(null, share(disk.used, disk.total)),
        esc(bytes(disk.used)) + " of " + esc(bytes(disk.total)) + ' used<br><span class="meta path">' +
        esc(disk.path || "") + "</span>"));
    }
    var gpus = res["cuda.device"] || {capacity: 0, used: 0};
    if (gpus.capacity || snap.gpus.length) {
      rows.push(row("GPUs", bar(share(gpus.used, gpus.capacity), null),
        esc(cores(gpus.used)) + " of " + esc(cores(gpus.capacity)) + " allocated"));
    }
    snap.gpus.forEach(function (gpu) {
      var holder = gpu.kernel_id ? "kernel " + gpu.kernel_id : "free";
      var t;
      if (gpu.error) {
        t = '<span class="warn">' + esc(gpu.error) + "</span> &middot; " + esc(holder);
      } else {
        t = esc(percent(gpu.util_percent)) + " busy &middot; " + esc(holder);
        if (gpu.mem_total) t += "<br>" + esc(bytes(gpu.mem_used)) + " of " + esc(bytes(gpu.mem_total)) + " memory";
      }
      rows.push(row("GPU " + esc(gpu.index) + '<br><span class="meta">' + esc(gpu.name) + "</span>",
        bar(gpu.kernel_id ? 100 : 0, isNum(gpu.util_percent) ? share(gpu.util_percent, 100) : null), t));
    });
    return '<table class="resources">' + rows.join("") + "</table>" +
      '<div class="legend"><span class="alloc"></span> allocated to kernels <span class="use"></span> measured use' +
      (node ? "" : " (not sampled yet)") + "</div>";
  }

  function serviceBase(service) {
    var host = String(service.host);
    return "http://" + (host.indexOf(":") >= 0 ? "[" + host + "]" : host) + ":" + service.port + "/";
  }

  function services(kernel) {
    var parts = (kernel.services || []).map(function (service) {
      var name = esc(service.name);
      if (service.port === null || service.port === undefined) {
        return name + ' <span class="meta">' + esc(service.status) + "</span>";
      }
      if (service.protocol === "http") {
        var base = serviceBase(service);
        return '<a href="' + esc(base) + '">' + name + '</a> <span class="meta">' + esc(base) + "</span>";
      }
      return name + ' <span class="meta">' + esc(service.host) + ":" + esc(service.port) + "</span>";
    });
    return parts.join("<br>") || "-";
  }

  function kernels(snap) {
    var samples = snap.stats.kernels;
    var rows = snap.kernels.map(function (kernel) {
      var sample = samples[kernel.kernel_id] || {};
      var res = kernel.resources || {};
      var usedCores = isNum(sample.cpu_util) ? sample.cpu_util / 100 : null;
      var cpuset = res.cpuset ? ' <span class="meta">cores ' + esc(res.cpuset) + "</span>" : "";
      var memUsed = isNum(sample.mem_bytes) ? sample.mem_bytes : null;
      var gpus = kernelGpus(kernel).join(", ") || "-";
      return "<tr><td><code>" + esc(kernel.kernel_id) + "</code></td><td>" + esc(kernel.image) + "</td>" +
        '<td class="status-' + esc(kernel.status) + '">' + esc(kernel.status) + "</td>" +
        '<td class="num">' + esc(duration(snap.now - kernel.created_at)) + "</td>" +
        '<td class="num">' + esc(duration(snap.now - kernel.last_used)) + "</td>" +
        "<td>" + bar(null, usedCores === null ? null : share(usedCores, res.cpu)) + "</td>" +
        '<td class="num">' + esc(cores(usedCores)) + " of " + esc(cores(res.cpu)) + cpuset + "</td>" +
        "<td>" + bar(null, memUsed === null ? null : share(memUsed, res.mem)) + "</td>" +
        '<td class="num">' + esc(bytes(memUsed)) + " of " + esc(bytes(res.mem)) + "</td>" +
        '<td class="num">' + esc(gpus) + "</td>" +
        '<td class="num">' + esc(bytes(sample.scratch_bytes)) + "</td>" +
        '<td class="services">' + services(kernel) + "</td></tr>";
    });
    return '<table class="kernels"><tr><th>kernel</th><th>image</th><th>status</th><th>age</th><th>idle</th>' +
      '<th colspan="2">CPU (cores used of granted)</th><th colspan="2">memory (used of granted)</th>' +
      "<th>GPUs</th><th>scratch</th><th>services</th></tr>" + (rows.join("") || none(12, "no kernels")) + "</table>" +
      pulls(snap) + pool(snap);
  }

  function pool(snap) {
    var state = snap.pool || {};
    var images = state.images || {};
    var rows = Object.keys(images).sort().map(function (image) {
      var entry = images[image];
      return "<tr><td>warm pool " + esc(image) + "</td><td>" + bar(null, share(entry.ready, entry.target)) + "</td>" +
        '<td class="num">' + esc(entry.ready) + " ready of " + esc(entry.target) + "</td>" +
        '<td class="num">' + esc(entry.filling) + " filling</td></tr>";
    });
    if (!rows.length) return "";
    var refill = state.last_refill_seconds;
    var summary = esc(state.claims || 0) + " claims, " + esc(state.misses || 0) + " misses" +
      (isNum(refill) ? ", last refill " + esc(Math.round(refill * 1000)) + " ms" : "");
    var problem = state.problem ? '<div class="warn">' + esc(state.problem) + "</div>" : "";
    return '<table class="pool">' + rows.join("") + "</table>" +
      '<div class="meta">warm pool: ' + summary + "</div>" + problem;
  }

  function pulls(snap) {
    var rows = (snap.pulls || []).map(function (pull) {
      var total = pull.bytes_total;
      var done = bytes(pull.bytes_done) + (total ? " of " + bytes(total) : "");
      return "<tr><td>pulling " + esc(pull.image) + "</td><td>" + bar(null, share(pull.bytes_done, total)) + "</td>" +
        '<td class="num">' + esc(done) + '</td><td class="num">' + esc(duration(pull.elapsed)) + "</td>" +
        '<td class="num">' + esc(pull.waiting) + " waiting</td></tr>";
    });
    return rows.length ? '<table class="pulls">' + rows.join("") + "</table>" : "";
  }

  // The last hour, as page.render_history: the same points, the same markup.
  var CHART_WIDTH = %(chart_width)d, CHART_HEIGHT = %(chart_height)d;
  function chartSegments(times, values, start, span, top) {
    var segments = [], segment = [];
    for (var i = 0; i < times.length && i < values.length; i++) {
      var value = values[i];
      if (value === null || value === undefined) {
        if (segment.length) { segments.push(segment); segment = []; }
        continue;
      }
      var x = Math.floor((times[i] - start) / span * CHART_WIDTH + 0.5);
      var y = CHART_HEIGHT - Math.floor(Math.min(Math.max(value / top, 0), 1) * CHART_HEIGHT + 0.5);
      segment.push([x, y]);
    }
    if (segment.length) segments.push(segment);
    return segments;
  }
  function known(values) { return values.filter(isNum); }
  function current(values) { var k = known(values); return k.length ? k[k.length - 1] : null; }
  function peak(values) { var k = known(values); return k.length ? Math.max.apply(null, k) : null; }
  function top(limit, highest) { return Math.max(limit || 0, highest || 0) || 1; }

  function chart(label, series, name, snap, fmt, limit, of) {
    var span = snap.history.span, values = series[name], highest = peak(values);
    var segments = chartSegments(series.times, values, snap.now - span, span, top(limit, highest));
    // A run of one reading is a line of no length: its round caps show it as a dot.
    var line = segments.map(function (s) {
      return "M" + (s.length === 1 ? [s[0], s[0]] : s).map(function (p) { return p[0] + "," + p[1]; }).join("L");
    }).join("");
    var area = segments.map(function (s) {
      return "M" + s[0][0] + "," + CHART_HEIGHT + s.map(function (p) { return "L" + p[0] + "," + p[1]; }).join("") +
        "L" + s[s.length - 1][0] + "," + CHART_HEIGHT + "Z";
    }).join("");
    return '<div class="chart"><div class="chart-head"><span class="chart-label">' + esc(label) + "</span> " +
      '<span class="now">' + esc(fmt(current(values))) + "</span> " +
      '<span class="meta">peak ' + esc(fmt(highest)) + esc(of || "") + "</span></div>" +
      '<svg class="spark" viewBox="0 0 ' + CHART_WIDTH + " " + CHART_HEIGHT + '" preserveAspectRatio="none" ' +
      'role="img" aria-label="' + esc(label) + ', last hour">' +
      '<path class="area" d="' + area + '"></path><path class="line" d="' + line + '"></path></svg></div>';
  }

  function historySection(snap) {
    var history = snap.history, node = history.node;
    var charts = chart("CPU", node, "cpu", snap, percent, 100) +
      chart("memory", node, "mem", snap, bytes, node.mem_total, " of " + bytes(node.mem_total)) +
      chart("scratch disk", node, "disk", snap, bytes, node.disk_total, " of " + bytes(node.disk_total));
    var rows = [];
    snap.kernels.forEach(function (kernel) {
      var series = history.kernels[kernel.kernel_id];
      if (!series) return;
      var res = kernel.resources || {};
      rows.push("<tr><td><code>" + esc(kernel.kernel_id) + "</code></td>" +
        "<td>" + chart("cores", series, "cpu", snap, cores, res.cpu, " of " + cores(res.cpu)) + "</td>" +
        "<td>" + chart("memory", series, "mem", snap, bytes, res.mem, " of " + bytes(res.mem)) + "</td></tr>");
    });
    var note = "the last " + history.span / 60 + " minutes: the machine every " + history.interval +
      " s, kernels the most of every " + history.kernel_step + " s";
    if (history.untracked_kernels) {
      note += "; " + history.untracked_kernels + " kernel(s) without history (more than the agent keeps)";
    }
    return '<div class="charts">' + charts + "</div>" +
      '<table class="history"><tr><th>kernel</th><th>CPU</th><th>memory</th></tr>' +
      (rows.join("") || none(3, "no kernel history yet")) + '</table><div class="legend">' + esc(note) + "</div>";
  }

  function images(snap) {
    var rows = snap.images.map(function (image) {
      return "<tr><td>" + esc(image.name) + "</td><td>" + esc(image.runtime_type) + "</td><td><code>" +
        esc(String(image.id).slice(0, 19)) + "</code></td></tr>";
    });
    return "<table><tr><th>name</th><th>runtime</th><th>id</th></tr>" +
      (rows.join("") || none(3, "no kernel images (labelled ai.backend.kernelspec=1)")) + "</table>";
  }

  function events(snap) {
    var rows = snap.events.slice().reverse().map(function (event) {
      return '<tr><td class="num when">' + esc(time(event.ts)) + "</td><td>" + esc(event.message) + "</td></tr>";
    });
    return "<table>" + (rows.join("") || none(2, "no events yet")) + "</table>";
  }

  var SECTIONS = [["summary", summary], ["health", healthSection], ["resources", resources],
                  ["history", historySection], ["kernels", kernels], ["images", images], ["events", events]];
  var indicator = document.getElementById("refresh");

  function draw(snap) {
    SECTIONS.forEach(function (section) {
      var element = document.getElementById(section[0]);
      var markup = section[1](snap);
      if (element && element.innerHTML !== markup) element.innerHTML = markup;
    });
  }

  function refresh() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (snap) {
        draw(snap);
        indicator.className = "meta";
        indicator.textContent = "live: updated " + time(snap.now) + ", every " + REFRESH_MS / 1000 + " s";
      })
      .catch(function (error) {
        indicator.className = "stale";
        indicator.textContent = "not updated since the last success: " + error.message;
      })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  refresh();
})();
""" % {"refresh_ms": REFRESH_SECONDS * 1000, "chart_width": CHART_WIDTH, "chart_height": CHART_HEIGHT}  # noqa: UP031
