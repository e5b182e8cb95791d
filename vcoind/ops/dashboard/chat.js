// The chat page: a conversation with the network, a task per turn. The turn goes in by
// vcoin_submitTask (messages, the chosen mode; single mode streams); its text comes on
// the task's WebSocket channel as the worker writes it (a consensus turn once agreed),
// then its verdict and, when settled, its anchor. Uses rpc() and el() from app.js; all
// text from the network goes through textContent.
"use strict";

const chat = { history: [], turns: new Map(), ws: null, open: null };

function chatSocket() {
  if (chat.open) return chat.open;
  chat.open = new Promise((resolve, reject) => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/ws`);
    ws.onopen = () => resolve(ws);
    ws.onerror = () => { chat.open = null; reject(new Error("chat: no WebSocket")); };
    ws.onclose = () => { chat.open = null; };
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.method !== "vcoin_subscription") return;
      const turn = chat.turns.get(msg.params.result.task_id);
      if (!turn) return;
      const r = msg.params.result;
      if (r.text !== undefined) delta(turn, r);
      else if (r.finished) finish(turn);
    };
  });
  return chat.open;
}

// Reasoning (a <think> model's text up to </think>) apart from the answer.
function split(text) {
  const at = text.indexOf("</think>");
  return at < 0 ? ["", text] : [text.slice(0, at), text.slice(at + 8).trimStart()];
}

function show(turn) {
  const [thought, answer] = split(turn.text);
  turn.thought.textContent = thought;
  turn.thought.hidden = !thought;
  turn.answer.textContent = answer;
}

function delta(turn, d) {
  if (d.restarts !== turn.restarts) {  // a retry wrote something else: start over
    turn.restarts = d.restarts;
    turn.text = "";
  }
  if (d.offset > turn.text.length) return refresh(turn);  // missed one: read the partial
  turn.text = turn.text.slice(0, d.offset) + d.text;
  turn.bubble.dataset.state = "streaming";
  show(turn);
}

async function refresh(turn) {
  const t = await rpc("vcoin_getTask", { task_id: turn.id });
  if (t.finished) return finish(turn, t);
  if (t.partial && t.partial.length > turn.text.length) {
    turn.text = t.partial;
    turn.bubble.dataset.state = "streaming";
    show(turn);
  }
}

async function finish(turn, t = null) {
  if (turn.done) return;
  turn.done = true;
  t = t || await rpc("vcoin_getTask", { task_id: turn.id });
  turn.text = t.result || "";
  show(turn);
  turn.bubble.dataset.state = t.status;
  const c = t.consensus;
  const verdict = c ? `consensus ${c.decision}, confidence ${num(c.confidence)} ` +
    `(${(c.replicas || []).length} replicas)` : `one node ${short(t.node_id)}`;
  turn.meta.textContent = `${t.status} · ${t.mode} · ${verdict} · ${t.progress} tokens` +
    (t.error ? ` · ${t.error}` : "");
  if (t.status === "completed") chat.history.push({ role: "assistant", content: split(turn.text)[1] });
  for (let i = 0; i < 10 && t.status === "completed"; i++) {  // the anchor lands later
    const a = (await rpc("vcoin_getTask", { task_id: turn.id })).anchor;
    if (a && (a.status === "anchored" || a.status === "failed")) {
      turn.anchor.textContent = `anchor ${a.status}` + (a.tx_hash ? ` tx ${short(a.tx_hash)} block ${a.block}` : "");
      break;
    }
    turn.anchor.textContent = a ? `anchor ${a.status}` : "no anchor";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function chatModels() {
  const select = document.getElementById("chat-model");
  const models = (await rpc("vcoin_networkModels")).models;
  const keep = select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id },
    `${m.id} (${m.vcoin.nodes} nodes${m.vcoin.spans_cover ? ", spans" : ""})`)));
  if (models.some((m) => m.id === keep)) select.value = keep;
}

async function chatSend(ev) {
  ev.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  const model = document.getElementById("chat-model").value;
  if (!text || !model) return;
  const mode = document.getElementById("chat-mode").value;
  input.value = "";
  const log = document.getElementById("chat-log");
  log.append(el("div", { class: "turn user" }, text));
  const turn = { text: "", restarts: 0, done: false };
  turn.thought = el("div", { class: "thought" });
  turn.thought.hidden = true;
  turn.answer = el("div", { class: "answer" });
  turn.meta = el("div", { class: "meta" }, "bidding…");
  turn.anchor = el("div", { class: "meta" });
  turn.bubble = el("div", { class: "turn assistant", "data-state": "pending" },
    turn.thought, turn.answer, turn.meta, turn.anchor);
  log.append(turn.bubble);
  chat.history.push({ role: "user", content: text });
  const req = { model, messages: chat.history, parameters: { max_new_tokens: 256 },
    mode: mode === "pipeline" ? "single" : mode, pipeline: mode === "pipeline",
    stream: mode !== "consensus" };
  try {
    const ws = await chatSocket();
    turn.id = (await rpc("vcoin_submitTask", req)).task_id;
    turn.bubble.dataset.task = turn.id;
    chat.turns.set(turn.id, turn);
    ws.send(JSON.stringify({ jsonrpc: "2.0", id: 2000 + chat.turns.size,
      method: "vcoin_subscribe", params: { channel: "task:" + turn.id } }));
    turn.meta.textContent = "running…";
    await refresh(turn);  // what it wrote before the subscription took
  } catch (e) {
    turn.bubble.dataset.state = "failed";
    turn.meta.textContent = "error: " + e.message;
  }
}

document.getElementById("chat-form").addEventListener("submit", chatSend);
tick(chatModels);
setInterval(() => tick(chatModels), 10000);
