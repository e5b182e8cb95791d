// VCoin node dashboard: the daemon's public JSON-RPC and WebSocket API, nothing else.
// All text from the network goes through textContent (never innerHTML).
"use strict";

let rpcId = 0;

// Authorised by the session cookie that the one-time link (`vcoin dashboard`) set: the
// browser sends it with these same-origin calls and the WebSocket, scripts cannot read it.
class SessionEnded extends Error {}

async function rpc(method, params = {}) {
  const res = await fetch("/rpc", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: ++rpcId, method, params }),
  });
  if (res.status === 401) throw new SessionEnded();
  const body = await res.json();
  if (body.error) throw new Error(body.error.message);
  return body.result;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's CSP
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const short = (id) => (id ? "…" + String(id).slice(-8) : "-");
const num = (x, d = 2) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
const ago = (t) => (t ? Math.max(0, Math.round(Date.now() / 1000 - t)) + " s ago" : "-");

// A two-column grid of label/value pairs (each in its own element: text nodes would merge).
function kv(...pairs) {
  return el("div", { class: "kv" }, ...pairs.map((x) =>
    el("span", {}, x === null || x === undefined ? "-" : x)));
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// --- cluster ---------------------------------------------------------------------
let me = null;

async function refreshNode() {
  const n = await rpc("vcoin_nodeInfo");
  me = n.peer_id;
  document.getElementById("node").replaceChildren(
    el("span", { class: "mono" }, short(n.peer_id)), " · network ", n.network,
    " · health ", num(n.health), " · up ", Math.round(n.uptime_s || 0), " s");
  // Long steps in flight (model fetch, split, load, CUDA graphs, LoRA), each with a bar.
  const mb = (x) => (x / 1e6).toFixed(1) + " MB";
  document.getElementById("progress").replaceChildren(...(n.progress || []).map((s) => {
    const amount = s.unit === "B" ? `${mb(s.done)} of ${mb(s.total)}, ${mb(s.rate)}/s`
      : `${Math.round(s.done)} of ${Math.round(s.total)} ${s.unit}`;
    return el("div", { class: "step", "data-kind": s.kind },
      el("span", { class: "bar", style: `width:${Math.round(120 * (s.fraction || 0))}px` }),
      ` ${s.kind} ${s.label}: ${Math.round(100 * (s.fraction || 0))} % (${amount})`,
      s.outcome === "running" ? "" : ` · ${s.outcome}`);
  }));
}

async function refreshPeers() {
  const peers = await rpc("vcoin_peers", { include_offline: true });
  fill(document.getElementById("peers"), peers.map((p) => {
    const online = p.connected !== false && p.status !== "offline";
    const dev = p.device || {};
    const stake = p.stake ? num(p.stake.stake, 0) : "-";
    const serves = [...(p.models || []).map((m) => m.name),
      ...(p.spans || []).map((s) => `${String(s.model).slice(-6)}:${s.start}-${s.end}`)];
    return el("tr", { "data-peer": p.peer_id },
      el("td", { class: "mono" }, short(p.peer_id)),
      el("td", { class: online ? "online" : "offline" }, online ? "online" : "offline"),
      el("td", {}, el("span", { class: "bar", style: `width:${Math.round(60 * (p.health || 0))}px` }),
        " ", num(p.health)),
      el("td", {}, dev.name || dev.kind || "-"),
      el("td", {}, dev.temperature_c == null ? "-" : num(dev.temperature_c, 0) + " °C"),
      el("td", {}, p.queue_length ?? "-"),
      el("td", {}, stake),
      el("td", {}, num(p.reputation_score, 1)),
      el("td", {}, serves.join(", ") || "-"));
  }));
}

// --- tasks -------------------------------------------------------------------------
const tasks = new Map();

function taskRow(t) {
  const tm = t.timings || {};
  const route = (t.route || []).map((r) => short(r.node_id)).join(" → ") || short(t.node_id);
  const label = { dispatch_s: "dispatch s", total_s: "total s", tokens_per_s: "tok/s" };
  const times = Object.keys(label).filter((k) => tm[k] != null)
    .map((k) => `${label[k]} ${num(tm[k])}`).join(" · ");
  return el("tr", { "data-task": t.task_id },
    el("td", { class: "mono" }, short(t.task_id)),
    el("td", { class: t.status }, t.status),
    el("td", {}, t.phase || "-"),
    el("td", {}, t.mode + (t.pipeline ? " (pipeline)" : "")),
    el("td", {}, t.model),
    el("td", { class: "mono" }, route),
    el("td", {}, t.progress ?? 0),
    el("td", {}, times || "-"));
}

function renderTasks() {
  const rows = [...tasks.values()].sort((a, b) => b.created_at - a.created_at).slice(0, 30);
  fill(document.getElementById("task-rows"), rows.map(taskRow));
}

async function refreshTasks() {
  const r = await rpc("vcoin_listTasks", { limit: 30 });
  for (const t of r.tasks || r) tasks.set(t.task_id, { ...tasks.get(t.task_id), ...t });
  renderTasks();
}

// --- consensus, chain, oracle --------------------------------------------------------
function matrix(c) {
  const ids = (c.replicas || []).map((r) => short(r.node_id));
  const head = el("tr", {}, el("th", {}, "similarity"), ...ids.map((i) => el("th", {}, i)));
  const rows = (c.similarity_matrix || []).map((row, i) => el("tr", {},
    el("th", {}, ids[i]), ...row.map((x) => el("td", { class: x >= 0.85 ? "ok" : "bad" },
      num(x)))));
  return el("table", { class: "matrix" }, head, ...rows);
}

async function refreshConsensus() {
  const box = document.getElementById("consensus-body");
  const [m, h] = await Promise.all([rpc("vcoin_consensusMetrics"),
    rpc("vcoin_consensusHistory", { limit: 8 })]);
  const tasks = h.tasks || [];
  const list = el("ul");
  for (const t of tasks) {
    list.append(el("li", {}, el("span", { class: "mono" }, short(t.task_id)), " ",
      el("span", { class: t.decision === "supermajority" ? "ok" : "warning" }, t.decision || "-"),
      ` · confidence ${num(t.confidence)} · ${t.replicas} replicas · ${t.action || ""}`));
  }
  const parts = [kv("agreement rate", num(m.agreement_rate),
    "recompute rate", num(m.recompute_rate))];
  if (tasks.length) { // the latest round in full: each replica against each other
    const c = (await rpc("vcoin_getTask", { task_id: tasks[0].task_id })).consensus;
    if (c && c.similarity_matrix) parts.push(matrix(c));
  }
  box.replaceChildren(...parts, list);
}

let chainNext = 0;
async function refreshChain() {
  const box = document.getElementById("chain-body");
  if (Date.now() < chainNext) return;
  chainNext = Date.now() + 15000;
  let info;
  try {
    info = await rpc("vcoin_chainInfo");
  } catch (e) {
    box.replaceChildren(el("div", { class: "dim" }, "no chain: " + e.message));
    return;
  }
  const [ops, ev] = await Promise.all([rpc("vcoin_chainOps", { limit: 5 }),
    rpc("vcoin_chainEvents", { limit: 5 })]);
  const list = el("ul");
  for (const o of ops.ops || []) {
    list.append(el("li", {}, "write ", el("span", { class: o.status }, o.status), " ", o.kind,
      " ", el("span", { class: "mono" }, o.tx_hash ? o.tx_hash.slice(0, 12) + "…" : "")));
  }
  for (const a of ev.anchors) {
    list.append(el("li", {}, el("span", { class: "anchored" }, "anchored"), " task ",
      el("span", { class: "mono" }, short(a.task_id)), ` · ${a.voters} voters · block ${a.block}`));
  }
  for (const r of ev.rewards) {
    list.append(el("li", {}, "reward ", num(r.amount, 3), " VCOIN → ",
      el("span", { class: "mono" }, short(r.node))));
  }
  for (const s of ev.slashes) {
    list.append(el("li", {}, el("span", { class: "bad" }, "slashed"), " ", num(s.amount, 0),
      " VCOIN from ", el("span", { class: "mono" }, short(s.node))));
  }
  for (const p of ev.proposals) {
    list.append(el("li", {}, "proposal ", el("span", { class: "mono" }, short(p.proposal_id)),
      ` ${p.state}: ${p.description}`));
  }
  box.replaceChildren(kv("chain id", info.chain_id, "mode", info.mode,
    "stake", num(info.stake, 0), "balance", num(info.balance, 2),
    "reachable", String(info.reachable)), list);
}

function spark(values) {
  const w = 300, h = 60;
  const lo = Math.min(...values), hi = Math.max(...values);
  const pts = values.map((v, i) =>
    `${(i / (values.length - 1)) * w},${h - ((v - lo) / (hi - lo || 1)) * (h - 4) - 2}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#58a6ff");
  svg.append(line);
  return svg;
}

let oracleNext = 0;
async function refreshOracle() {
  const box = document.getElementById("oracle-body");
  if (Date.now() < oracleNext) return;
  oracleNext = Date.now() + 60000; // analyses are cached for minutes: no need to hurry
  let st;
  try {
    st = await rpc("vcoin_oracleStatus");
  } catch (e) {
    box.replaceChildren(el("div", {}, "oracle off on this node"));
    return;
  }
  const parts = [kv(...st.sources.flatMap((s) =>
    [s.source, el("span", { class: s.status === "ok" ? "ok" : "warning" }, s.status)]))];
  try {
    const p = await rpc("vcoin_oraclePriceAnalysis", { symbol: st.symbols[0] || "QUBIC" });
    parts.push(el("div", {}, `${p.symbol} ${Number(p.price).toPrecision(6)} · trend ${p.trend}`
      + ` · RSI ${num(p.indicators.rsi_14, 1)} · risk ${p.risk.level}`));
    if (p.series && p.series.length > 1) parts.push(spark(p.series));
  } catch (e) {
    parts.push(el("div", { class: "warning" }, "price: " + e.message));
  }
  try {
    const s = await rpc("vcoin_oracleSentiment", { range: "24h" });
    parts.push(el("div", {}, `sentiment ${num(s.sentiment_score)} (${s.label || "-"}) · `
      + `confidence ${num(s.confidence)} · ${s.articles} articles`));
  } catch (e) {
    parts.push(el("div", { class: "warning" }, "sentiment: " + e.message));
  }
  box.replaceChildren(...parts);
}

// --- SLAs -------------------------------------------------------------------------------
async function refreshSLAs() {
  const box = document.getElementById("sla-body");
  const r = await rpc("vcoin_slaList");
  if (!r.slas.length) {
    box.replaceChildren(el("div", {}, "no SLA on this node (vcoin sla create)"));
    return;
  }
  box.replaceChildren(el("table", {}, el("tr", {}, ...["customer", "state", "uptime %",
    "p95 s", "per day"].map((h) => el("th", {}, h))), ...r.slas.map((s) => el("tr",
    { "data-customer": s.customer }, el("td", {}, s.customer),
    el("td", { class: s.compliant ? "ok" : "bad" }, s.compliant ? "compliant"
      : "violated: " + s.violations.join(", ")),
    el("td", {}, num(s.uptime_pct, 3)), el("td", {}, num(s.p95_latency_s, 3)),
    el("td", {}, num(s.throughput_per_day, 1))))));
}

// --- alerts ---------------------------------------------------------------------------
const alerts = new Map();

function renderAlerts() {
  const rows = [...alerts.values()].sort((a, b) => (a.active === b.active)
    ? b.started_at - a.started_at : (a.active ? -1 : 1)).slice(0, 40);
  document.getElementById("alert-list").replaceChildren(...rows.map((a) =>
    el("li", { "data-alert": a.id }, el("span", { class: a.active ? a.severity : "ok" },
      a.active ? a.severity : "resolved"), " ", a.rule, ": ", a.message, " · ",
    ago(a.resolved_at || a.started_at))));
}

async function refreshAlerts() {
  try {
    const r = await rpc("vcoin_alerts", { limit: 40 });
    for (const a of r.alerts) alerts.set(a.id, a);
  } catch (e) {
    alerts.clear();
  }
  renderAlerts();
}

// --- live updates -----------------------------------------------------------------------
let ended = false;

function sessionEnded() {
  ended = true;
  const badge = document.getElementById("live");
  badge.textContent = "session ended: run `vcoin dashboard` for a new link";
  badge.className = "badge warning";
}

function connect() {
  if (ended) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws`);
  const badge = document.getElementById("live");
  ws.onopen = () => {
    badge.textContent = "live";
    badge.className = "badge ok";
    for (const [i, channel] of ["tasks", "alerts"].entries()) {
      ws.send(JSON.stringify({ jsonrpc: "2.0", id: 1000 + i, method: "vcoin_subscribe",
        params: { channel } }));
    }
  };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.method !== "vcoin_subscription") return;
    const { channel, result } = msg.params;
    if (channel === "tasks") {
      tasks.set(result.task_id, { ...tasks.get(result.task_id), ...result });
      renderTasks();
    } else if (channel === "alerts") {
      alerts.set(result.id, result);
      renderAlerts();
    }
  };
  ws.onclose = () => {
    if (ended) return;
    badge.textContent = "reconnecting";
    badge.className = "badge warning";
    setTimeout(connect, 2000);
  };
}

async function tick(fn) {
  try {
    await fn();
  } catch (e) {
    if (e instanceof SessionEnded) sessionEnded();
    else if (!ended) document.getElementById("live").textContent = "degraded: " + e.message;
  }
}

async function loop() {
  await Promise.all([refreshNode, refreshPeers, refreshTasks, refreshConsensus, refreshChain,
    refreshOracle, refreshSLAs, refreshAlerts].map(tick));
  if (!ended) setTimeout(loop, 2000);
}

connect();
loop();
