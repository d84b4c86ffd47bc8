// The fleet map: every GPU one cell, grouped datacenter > cluster > rack > node, live.
// Plain script, no libraries, nothing fetched but from this collector; every text from the
// fleet is set as text (textContent), never as markup.
"use strict";

const HEALTH_COLOURS = {
  healthy: "#2e9e4f", at_risk: "#7fb2e5", degraded: "#e0a526", unhealthy: "#d83c3c", lost: "#9b4dca", unreachable: "#5d636b",
};
const NO_VALUE = "#30343a";
// Measures: the column of a GPU's row, and the range its colour spans.
const MEASURES = {
  util: { column: 3, min: 0, max: 1, unit: "%", scale: 100 },
  sm: { column: 4, min: 0, max: 1, unit: "%", scale: 100 },
  temp: { column: 5, min: 25, max: 90, unit: " C", scale: 1 },
  power: { column: 6, min: 0, max: 1000, unit: " W", scale: 1 },
  mem: { column: 7, min: 0, max: 1, unit: "%", scale: 100 },
};
const GAP = 1;
const HEADER = 16;
// Past this many GPUs a node is drawn as one cell (its worst health, its mean measure).
const NODE_CELLS_ABOVE = 40000;

const canvas = document.getElementById("map");
const ctx = canvas.getContext("2d");
const tooltip = document.getElementById("tooltip");
const banner = document.getElementById("banner");
const measureSelect = document.getElementById("measure");
const search = document.getElementById("search");

const state = { nodes: new Map(), order: [], blocks: [], summary: {}, events: [], version: 0, cell: 8,
                perNode: false, query: "", matches: null, drawn: 0 };

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value == null ? "" : String(value);
  if (className) element.className = className;
  return element;
}

function ramp(fraction) {
  // dark blue -> teal -> yellow
  const f = Math.max(0, Math.min(1, fraction));
  const r = Math.round(30 + f * 220), g = Math.round(60 + f * 170), b = Math.round(140 - f * 110);
  return `rgb(${r},${g},${b})`;
}

function colourOf(row, measure) {
  if (measure === "health") return HEALTH_COLOURS[row[2]] || NO_VALUE;
  const m = MEASURES[measure];
  const value = row[m.column];
  return value == null ? NO_VALUE : ramp((value - m.min) / (m.max - m.min));
}

function worst(rows) {
  const order = ["healthy", "at_risk", "degraded", "unhealthy", "unreachable", "lost"];
  return rows.reduce((a, r) => (order.indexOf(r[2]) > order.indexOf(a[2]) ? r : a), rows[0]);
}

function nodeColour(node, measure) {
  if (!node.gpus.length) return NO_VALUE;
  if (measure === "health") return colourOf(worst(node.gpus), measure);
  const m = MEASURES[measure];
  const values = node.gpus.map((r) => r[m.column]).filter((v) => v != null);
  if (!values.length) return NO_VALUE;
  return ramp((values.reduce((a, b) => a + b, 0) / values.length - m.min) / (m.max - m.min));
}

function sortOrder() {
  state.order = [...state.nodes.values()].sort((a, b) =>
    (a.dc + "\0" + a.cluster + "\0" + a.rack + "\0" + a.name).localeCompare(b.dc + "\0" + b.cluster + "\0" + b.rack + "\0" + b.name));
}

// Place every node's block for cell size `c` in width `width`; return the height used.
function place(c, width, perNode) {
  const blocks = [];
  const step = c + GAP;
  const nodeW = perNode ? step : 4 * step, nodeH = perNode ? step : 2 * step;
  let x = 0, y = 0, group = null, rack = null;
  for (const node of state.order) {
    const key = node.dc + " / " + (node.cluster || "(no cluster)");
    if (key !== group) {
      if (group !== null) y += nodeH + 6;
      blocks.push({ header: key, x: 0, y: y + 12 });
      y += HEADER; x = 0; group = key; rack = node.rack;
    } else if (node.rack !== rack) {
      rack = node.rack;
      x += step; // a gap between racks
    }
    if (x + nodeW > width) { x = 0; y += nodeH + GAP; }
    blocks.push({ node, x, y, w: nodeW, h: nodeH });
    x += nodeW + GAP;
  }
  return { blocks, height: y + nodeH };
}

function layout() {
  const width = Math.max(320, canvas.parentElement.clientWidth - 24);
  const room = Math.max(200, window.innerHeight - canvas.getBoundingClientRect().top - 16);
  const gpus = state.order.reduce((n, node) => n + node.gpus.length, 0);
  state.perNode = gpus > NODE_CELLS_ABOVE;
  let chosen = null;
  for (let c = 14; c >= 2; c--) {
    chosen = { c, ...place(c, width, state.perNode) };
    if (chosen.height <= room) break;
  }
  state.cell = chosen.c;
  state.blocks = chosen.blocks;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio; canvas.height = chosen.height * ratio;
  canvas.style.width = width + "px"; canvas.style.height = chosen.height + "px";
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
}

function cellRect(block, index) {
  const step = state.cell + GAP;
  if (state.perNode) return { x: block.x, y: block.y, w: state.cell, h: state.cell };
  return { x: block.x + (index % 4) * step, y: block.y + Math.floor(index / 4) * step, w: state.cell, h: state.cell };
}

function draw() {
  const measure = measureSelect.value;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  let drawn = 0;
  for (const block of state.blocks) {
    if (block.header) { ctx.fillStyle = "#8a8f98"; ctx.fillText(block.header, block.x, block.y); continue; }
    const node = block.node;
    ctx.globalAlpha = state.matches && !state.matches.has(node.id) ? 0.2 : 1;
    if (state.perNode) {
      const r = cellRect(block, 0);
      ctx.fillStyle = nodeColour(node, measure); ctx.fillRect(r.x, r.y, r.w, r.h); drawn += 1;
      continue;
    }
    node.gpus.forEach((row, i) => {
      const r = cellRect(block, i);
      ctx.fillStyle = colourOf(row, measure); ctx.fillRect(r.x, r.y, r.w, r.h); drawn += 1;
    });
  }
  ctx.globalAlpha = 1;
  state.drawn = drawn;
  canvas.dataset.cells = String(drawn);
  canvas.dataset.version = String(state.version);
}

function legend() {
  const box = document.getElementById("legend");
  box.replaceChildren();
  const measure = measureSelect.value;
  const item = (colour, label) => { const s = text("span", label); const i = document.createElement("i"); i.style.background = colour; s.prepend(i); box.append(s); };
  if (measure === "health") Object.entries(HEALTH_COLOURS).forEach(([k, v]) => item(v, k));
  else { const m = MEASURES[measure]; [0, 0.5, 1].forEach((f) => item(ramp(f), Math.round((m.min + f * (m.max - m.min)) * m.scale) + m.unit)); }
  item(NO_VALUE, "no reading");
  if (state.perNode) box.append(text("span", "one cell per node (its worst health, its mean)"));
}

function tiles() {
  const s = state.summary, box = document.getElementById("tiles");
  const by = (o) => Object.entries(o || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  const tile = (value, label) => { const t = text("div", "", "tile"); t.append(text("b", value), text("span", label)); box.append(t); };
  box.replaceChildren();
  tile(s.gpus, by(s.gpus_by_health) || "GPUs");
  tile(s.nodes, by(s.nodes_by_state) || "nodes");
  tile(s.mean_utilization == null ? "-" : (s.mean_utilization * 100).toFixed(1) + " %", "mean utilization");
  tile(((s.power_watts || 0) / 1000).toFixed(1) + " kW", "power");
  tile(s.idle_gpus, "idle GPUs");
}

function feed() {
  const list = document.getElementById("events");
  list.replaceChildren(...state.events.slice(-50).reverse().map((e) => {
    const li = text("li", "", e.severity);
    const when = new Date(e.time * 1000).toLocaleTimeString();
    li.append(text("div", `${when} ${e.kind} ${e.node}${e.gpu == null ? "" : " gpu " + e.gpu}`), text("div", e.reason, "info"));
    return li;
  }));
}

// The collector finds the nodes (by name, id, GPU UUID or serial, or who holds a GPU).
let searching = 0;
async function applyQuery() {
  const q = search.value.trim();
  const asked = ++searching;
  if (!q) { state.matches = null; document.getElementById("matches").textContent = ""; draw(); return; }
  const answer = await fetch("api/search?q=" + encodeURIComponent(q), { cache: "no-store" });
  if (!answer.ok || asked !== searching) return;
  state.matches = new Set(await answer.json());
  document.getElementById("matches").textContent = `${state.matches.size} nodes match`;
  draw();
}

function render() { sortOrder(); layout(); draw(); legend(); tiles(); feed(); }

async function load() {
  const answer = await fetch("api/fleet", { cache: "no-store" });
  if (!answer.ok) throw new Error(`the collector answered ${answer.status}`);
  const fleet = await answer.json();
  state.nodes = new Map(fleet.nodes.map((n) => [n.id, n]));
  state.summary = fleet.summary; state.events = fleet.events; state.version = fleet.version;
  render();
}

function hit(event) {
  const bounds = canvas.getBoundingClientRect();
  const x = event.clientX - bounds.left, y = event.clientY - bounds.top;
  for (const block of state.blocks) {
    if (block.header || x < block.x || y < block.y || x >= block.x + block.w || y >= block.y + block.h) continue;
    if (state.perNode) return { node: block.node, row: null };
    const step = state.cell + GAP;
    const index = Math.floor((y - block.y) / step) * 4 + Math.floor((x - block.x) / step);
    return { node: block.node, row: block.node.gpus[index] || null };
  }
  return null;
}

function describe(found) {
  const n = found.node, r = found.row;
  const lines = [`${n.name} (${n.state})`, `${n.dc || "-"} / ${n.cluster || "-"} / rack ${n.rack || "-"}`];
  if (r) {
    lines.push(`GPU ${r[0]}  ${r[1]}  ${r[2]}`);
    for (const [name, m] of Object.entries(MEASURES)) {
      const v = r[m.column];
      if (v != null) lines.push(`${name} ${Math.round(v * m.scale * 10) / 10}${m.unit}`);
    }
  }
  return lines.join("\n");
}

canvas.addEventListener("mousemove", (event) => {
  const found = hit(event);
  if (!found) { tooltip.hidden = true; return; }
  tooltip.textContent = describe(found);
  tooltip.hidden = false;
  const box = canvas.parentElement.getBoundingClientRect();
  tooltip.style.left = event.clientX - box.left + 14 + "px";
  tooltip.style.top = event.clientY - box.top + 14 + "px";
});
canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
canvas.addEventListener("click", (event) => { const found = hit(event); if (found) showNode(found.node.id); });

async function showNode(id) {
  const answer = await fetch("api/node?id=" + encodeURIComponent(id), { cache: "no-store" });
  if (!answer.ok) return;
  const node = await answer.json();
  const panel = document.getElementById("detail"), body = document.getElementById("detail-body");
  document.getElementById("detail-title").textContent = node.name;
  body.replaceChildren(
    text("div", `${node.state} · ${node.datacenter || "-"} / ${node.cluster || "-"} / rack ${node.rack || "-"} · driver ${node.driver || "-"}`, "info"),
    text("div", `host ${node.hostname || "-"} · id ${node.id}`, "info"));
  const table = document.createElement("table");
  const head = document.createElement("tr");
  ["GPU", "health", "why, and what to do", "held by"].forEach((h) => head.append(text("th", h)));
  table.append(head);
  for (const g of node.gpus) {
    const tr = document.createElement("tr");
    const why = [...g.reasons, g.action ? "action: " + g.action : ""].filter(Boolean).join("; ");
    const holders = g.holders.map((h) => Object.values(h).join("/")).join(", ");
    tr.append(text("td", `${g.gpu} ${g.model}\n${g.serial || ""}`), text("td", g.health, g.health === "healthy" ? "" : "critical"), text("td", why), text("td", holders));
    table.append(tr);
  }
  body.append(table, text("h2", "Recent events"));
  const list = document.createElement("ol");
  list.id = "node-events";
  node.events.forEach((e) => list.append(text("li", `${new Date(e.time * 1000).toLocaleTimeString()} ${e.kind}: ${e.reason}`, e.severity)));
  body.append(list);
  panel.hidden = false;
  panel.dataset.node = node.name;
}
document.getElementById("close").addEventListener("click", () => { document.getElementById("detail").hidden = true; });
measureSelect.addEventListener("change", () => { draw(); legend(); });
search.addEventListener("input", () => { applyQuery().catch(() => {}); });
window.addEventListener("resize", () => { layout(); draw(); });

function follow() {
  const stream = new EventSource("api/stream");
  let lost = false;
  stream.addEventListener("hello", () => {
    if (lost) { banner.hidden = true; load().catch(() => {}); }
    lost = false;
  });
  stream.addEventListener("tick", (message) => {
    const tick = JSON.parse(message.data);
    for (const row of tick.nodes) state.nodes.set(row.id, row);
    for (const id of tick.removed) state.nodes.delete(id);
    state.summary = tick.summary; state.version = tick.version;
    state.events.push(...tick.events);
    if (state.events.length > 200) state.events.splice(0, state.events.length - 200);
    if (tick.nodes.length || tick.removed.length) { sortOrder(); layout(); draw(); }
    tiles(); if (tick.events.length) feed();
  });
  stream.onerror = () => {
    lost = true;
    banner.textContent = "The collector does not answer: reconnecting…";
    banner.hidden = false;
  };
}

// For tests and scripts: what is drawn, where, and in which colour.
window.gpufleetMap = {
  get cells() { return state.drawn; },
  get version() { return state.version; },
  color(name, gpu) {
    const node = [...state.nodes.values()].find((n) => n.name === name);
    if (!node) return null;
    return state.perNode ? nodeColour(node, measureSelect.value) : colourOf(node.gpus.find((r) => r[0] === gpu), measureSelect.value);
  },
  point(name, gpu) {
    const block = state.blocks.find((b) => b.node && b.node.name === name);
    if (!block) return null;
    const index = state.perNode ? 0 : block.node.gpus.findIndex((r) => r[0] === gpu);
    const r = cellRect(block, index), bounds = canvas.getBoundingClientRect();
    return { x: bounds.left + r.x + r.w / 2, y: bounds.top + r.y + r.h / 2 };
  },
};

load().then(follow).catch((error) => { banner.textContent = "Cannot load the fleet: " + error.message; banner.hidden = false; follow(); });
