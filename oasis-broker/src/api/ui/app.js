// The Oasis page: reads the API of the daemon that serves it (the same
// origin), with the secret the user gives; nothing is loaded from
// elsewhere. Lists refresh every second while their tab is shown.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { secret: null, tab: "overview", flows: [], series: {}, sockets: [] };
const COLORS = ["#0b7a75", "#c2410c", "#4338ca", "#a21caf", "#15803d", "#b45309", "#0369a1", "#be123c"];
const HISTORY = 120;

function loadSecret() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("secret")) {
    sessionStorage.setItem("oasis-secret", hash.get("secret"));
    history.replaceState(null, "", location.pathname);
  }
  state.secret = sessionStorage.getItem("oasis-secret");
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.secret) headers.Authorization = "Bearer " + state.secret;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) { askSecret(); throw new Error("the API wants its secret"); }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

function askSecret() {
  $("login").hidden = false;
  setState("the API wants its secret", true);
}

function setState(text, bad) {
  $("state").textContent = text;
  $("state").className = bad ? "bad" : "muted";
}

function stream(path, onMessage) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (state.secret) url.searchParams.set("token", state.secret);
  let socket;
  const open = () => {
    socket = new WebSocket(url);
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    // Reconnect all streams' way: after a pause, on their own.
    socket.onclose = () => setTimeout(open, 2000);
  };
  open();
  state.sockets.push(() => socket);
}

function cell(content, className) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = content == null ? "" : String(content);
  if (className) td.className = className;
  return td;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : cell(c));
  return tr;
}

function fill(tbody, rows) {
  $(tbody).replaceChildren(...rows);
}

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function ago(secs) {
  if (secs < 90) return Math.round(secs) + " s";
  if (secs < 5400) return Math.round(secs / 60) + " min";
  return (secs / 3600).toFixed(1) + " h";
}

// Overview: cards and the chart of claimed bytes per carrier.
async function overview() {
  const status = (await api("/oasis/status")).status;
  const cards = [
    ["Rules", status.rules], ["Overlays", status.overlays],
    ["Live flows", status.broker.flows], ["Flows started", status.broker.flows_started],
    ["Classified", status.classifier.classified], ["Diverted", status.classifier.diverted],
    ["Heartbeat", status.heartbeat.alive ? "alive" : "FAIL OPEN"], ["Up", ago(status.uptime_secs)],
  ];
  $("cards").replaceChildren(...cards.map(([name, value]) => {
    const div = document.createElement("div");
    div.className = "card";
    const b = document.createElement("b");
    b.textContent = value;
    div.append(b, name);
    return div;
  }));
}

function onTraffic(sample) {
  for (const [name, rate] of Object.entries(sample.carriers || {})) {
    (state.series[name] = state.series[name] || []).push(rate);
  }
  for (const values of Object.values(state.series)) {
    while (values.length > HISTORY) values.shift();
  }
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  const names = Object.keys(state.series);
  const max = Math.max(1, ...names.flatMap((n) => state.series[n]));
  g.strokeStyle = "#e3e6ea";
  g.fillStyle = "#6b7380";
  g.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) {
    const y = height - 20 - (i * (height - 30)) / 4;
    g.beginPath(); g.moveTo(50, y); g.lineTo(width, y); g.stroke();
    g.fillText(bytes((max * i) / 4), 2, y + 4);
  }
  names.forEach((name, i) => {
    const values = state.series[name];
    g.strokeStyle = COLORS[i % COLORS.length];
    g.lineWidth = 2;
    g.beginPath();
    values.forEach((v, x) => {
      const px = 50 + ((width - 50) * (HISTORY - values.length + x)) / (HISTORY - 1);
      const py = height - 20 - (v / max) * (height - 30);
      if (x === 0) g.moveTo(px, py); else g.lineTo(px, py);
    });
    g.stroke();
  });
  $("legend").replaceChildren(...names.map((name, i) => {
    const span = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[i % COLORS.length];
    span.append(swatch, name);
    return span;
  }));
}

// Connections: the Clash shape, which carries the host and the chain.
function flowText(c) {
  const m = c.metadata;
  return [m.network, m.sourceIP, m.sourcePort, m.destinationIP, m.destinationPort, m.host,
    c.chains.join(" "), c.rulePayload, m.process, c.oasis && c.oasis.why].join(" ").toLowerCase();
}

function shownFlows() {
  const words = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  return state.flows.filter((c) => words.every((w) => flowText(c).includes(w)));
}

function onConnections(snapshot) {
  state.flows = snapshot.connections || [];
  if (state.tab === "connections") drawFlows();
}

function drawFlows() {
  const shown = shownFlows();
  $("count").textContent = shown.length + " of " + state.flows.length + " flows";
  fill("flows", shown.slice(0, 500).map((c) => {
    const m = c.metadata;
    const close = document.createElement("button");
    close.textContent = "Close";
    close.className = "danger";
    close.onclick = () => closeFlows([c.id]);
    const started = (Date.now() - Date.parse(c.start)) / 1000;
    return row([
      cell(`${m.network} ${m.sourceIP}:${m.sourcePort} → ${m.destinationIP}:${m.destinationPort}`, "mono"),
      m.host, c.chains.join(" ← "), (c.oasis && c.oasis.why) || "",
      m.process || (m.processPath ? `uid ${m.uid} ${m.processPath}` : ""), ago(started), cell(close),
    ]);
  }));
}

async function closeFlows(ids) {
  try {
    await Promise.all(ids.map((id) => api("/connections/" + encodeURIComponent(id), { method: "DELETE" })));
    setState("closed " + ids.length + " flow(s)");
  } catch (e) {
    setState("closing: " + e.message, true);
  }
}

async function rules() {
  const { rules } = await api("/oasis/rules");
  fill("rule-rows", rules.map((r) => row([
    r.id, cell(r.subset, "mono"), r.via,
    cell(r.answers != null ? r.answers + " answers" : r.packets, "num"), cell(bytes(r.bytes), "num"),
  ])));
}

async function carriers() {
  const { monitor } = await api("/oasis/monitor");
  const best = {};
  for (const p of monitor.paths) {
    const b = (best[p.carrier] = best[p.carrier] || {});
    if (p.srtt_ms != null) b.rtt = Math.min(b.rtt ?? Infinity, p.srtt_ms);
    if (p.loss_percent != null) b.loss = Math.max(b.loss ?? 0, p.loss_percent);
    if (p.goodput_mbps != null) b.goodput = Math.max(b.goodput ?? 0, p.goodput_mbps);
  }
  fill("carrier-rows", monitor.carriers.map((c) => {
    const b = best[c.name] || {};
    return row([
      c.name,
      cell(c.up ? "up" : "down" + (c.down_reason ? ": " + c.down_reason : ""), c.up ? "up" : "down"),
      b.rtt != null ? b.rtt.toFixed(1) + " ms" : "", b.loss != null ? b.loss.toFixed(2) + " %" : "",
      b.goodput != null ? b.goodput.toFixed(1) + " Mbit/s" : "", cell(Math.round(c.probe_bytes_per_second), "num"),
    ]);
  }));
  fill("decision-rows", monitor.decisions.map((d) => row([d.rule, d.prefix, d.carrier, d.why, d.comparison])));
  $("switches").replaceChildren(...monitor.switches.map((s) => {
    const li = document.createElement("li");
    li.textContent = `${ago(s.ago_secs)} ago: rule ${s.rule} ${s.prefix}: ${s.from} → ${s.to} (${s.why})`;
    return li;
  }));
}

async function overlays() {
  const { overlays } = await api("/oasis/overlays");
  fill("overlay-rows", overlays.map((o) => {
    let stateText = "joined";
    if (o.wireguard) {
      stateText = o.wireguard.peers.map((p) => p.state +
        (p.last_handshake_secs != null ? `, handshake ${ago(p.last_handshake_secs)} ago` : "")).join("; ");
    } else if (o.module_status) {
      stateText = "module: " + JSON.stringify(o.module_status.state || o.module_status);
    }
    return row([
      o.name, o.wireguard ? "WireGuard" : o.module ? "module" : "plain",
      cell((o.resolved.length ? o.resolved : o.entries).join(", "), "mono"), stateText,
      cell(o.live_flows, "num"), cell(o.packets_sent + " / " + o.packets_received, "num"),
    ]);
  }));
}

function onLog(line) {
  const pre = $("log-lines");
  pre.append(`${new Date().toLocaleTimeString()} ${line.type.padEnd(7)} ${line.payload}\n`);
  while (pre.childNodes.length > 1000) pre.removeChild(pre.firstChild);
}

const VIEWS = { overview, rules, carriers, overlays, connections: async () => drawFlows(), logs: async () => {} };

async function refresh() {
  try {
    await VIEWS[state.tab]();
    setState("live");
  } catch (e) {
    setState(e.message, true);
  }
}

function show(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("on", b.dataset.tab === tab);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== tab;
  refresh();
}

let logStream = null;
function startLogs() {
  if (logStream) logStream.close();
  const url = new URL("/logs?level=" + $("level").value, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (state.secret) url.searchParams.set("token", state.secret);
  logStream = new WebSocket(url);
  logStream.onmessage = (event) => onLog(JSON.parse(event.data));
}

function start() {
  loadSecret();
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => show(b.dataset.tab);
  $("login").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem("oasis-secret", $("secret").value);
    location.reload();
  };
  $("filter").oninput = drawFlows;
  $("close-filtered").onclick = () => {
    const ids = shownFlows().map((c) => c.id);
    if (ids.length && confirm(`Close ${ids.length} flow(s)? Their applications see the connection aborted.`)) {
      closeFlows(ids);
    }
  };
  $("level").onchange = startLogs;
  $("clear-logs").onclick = () => $("log-lines").replaceChildren();
  stream("/traffic", onTraffic);
  stream("/connections?interval=1000", onConnections);
  startLogs();
  refresh();
  setInterval(refresh, 1000);
}

start();
