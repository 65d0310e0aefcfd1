// The inferkit status page: polls /v2/status and draws it with the DOM and inline SVG. No dependencies.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3b6fd8", "#e07b39", "#1f9d55", "#9b59b6", "#d64545", "#16a2b8"];
let refreshMs = 2000;

// Elements are built with textContent only: names from the server never become markup.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function fmt(x, digits = 2) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  return x.toFixed(digits);
}

function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }

function pill(text, kind) { return h("span", { class: "pill " + (kind || "") }, text); }

function table(headers, rows) {
  const head = h("tr", {}, ...headers.map((x) => h("th", {}, x)));
  return h("table", {}, h("thead", {}, head), h("tbody", {}, ...rows.map((r) => h("tr", {}, ...r.map((x) => h("td", {}, x))))));
}

// A bar chart of label -> value.
function bars(entries, opts = {}) {
  const w = opts.width || 260, rowH = 16, labelW = opts.labelWidth || 60;
  const max = Math.max(1, ...entries.map((e) => e[1]));
  const svg = s("svg", { width: w, height: rowH * entries.length + 4, role: "img", "aria-label": opts.label || "bars" });
  entries.forEach(([label, value], i) => {
    const y = i * rowH + 2;
    const len = ((w - labelW - 50) * value) / max;
    svg.append(s("text", { x: 0, y: y + 11 }, label));
    svg.append(s("rect", { x: labelW, y, width: Math.max(1, len), height: rowH - 4, fill: opts.color || COLORS[0], rx: 2 }));
    svg.append(s("text", { x: labelW + len + 4, y: y + 11 }, fmt(value)));
  });
  return svg;
}

// Requests/s and errors/s over time: [seconds before now, req/s, err/s].
function sparkline(history) {
  const w = 320, hgt = 70, pad = 4;
  const svg = s("svg", { width: w, height: hgt, role: "img", "aria-label": "requests per second" });
  svg.append(s("rect", { x: 0, y: 0, width: w, height: hgt, fill: "#fafbfc", stroke: "#e3e6ec" }));
  if (history.length < 1) {
    svg.append(s("text", { x: 8, y: hgt / 2 }, "collecting…"));
    return svg;
  }
  const t0 = Math.min(...history.map((p) => p[0])), t1 = Math.max(0, ...history.map((p) => p[0]));
  const top = Math.max(1, ...history.map((p) => p[1]));
  const x = (t) => pad + ((w - 2 * pad) * (t - t0)) / Math.max(1, t1 - t0);
  const y = (v) => hgt - pad - ((hgt - 2 * pad - 12) * v) / top;
  const line = (i, color) => s("polyline", { fill: "none", stroke: color, "stroke-width": 1.5,
    points: history.map((p) => `${x(p[0]).toFixed(1)},${y(p[i]).toFixed(1)}`).join(" ") });
  svg.append(line(1, COLORS[0]), line(2, "#d64545"));
  svg.append(s("text", { x: pad + 2, y: 12 }, `max ${fmt(top, 1)}/s`));
  return svg;
}

// Traffic split as one stacked bar.
function splitBar(weights) {
  const w = 420, hgt = 22;
  const svg = s("svg", { width: w, height: hgt + 16, role: "img", "aria-label": "traffic split" });
  let x = 0;
  Object.entries(weights).forEach(([arm, share], i) => {
    const len = w * share;
    svg.append(s("rect", { x, y: 0, width: Math.max(0, len), height: hgt, fill: COLORS[i % COLORS.length] }));
    if (len > 30) svg.append(s("text", { x: x + 4, y: hgt + 12 }, `${arm} ${pct(share)}`));
    x += len;
  });
  return svg;
}

// A canary's steps: done, current, to come.
function stepsChart(c) {
  const w = 40 * c.steps.length + 20, svg = s("svg", { width: w, height: 40, role: "img", "aria-label": "canary steps" });
  c.steps.forEach((weight, i) => {
    const done = i < c.step || c.state === "promoted";
    const current = i === c.step && c.state !== "promoted" && c.state !== "rolled_back";
    const fill = c.state === "rolled_back" && i === c.step ? "#d64545" : done ? "#1f9d55" : current ? "#3b6fd8" : "#e3e6ec";
    svg.append(s("circle", { cx: 20 + 40 * i, cy: 12, r: current ? 8 : 6, fill }));
    svg.append(s("text", { x: 8 + 40 * i, y: 36 }, pct(weight)));
  });
  return svg;
}

// Observed guard numbers against their limits (a bar per check, the limit as a line).
function guardChart(guard) {
  const rows = Object.entries(guard.limits).filter(([k, v]) => v !== null && k in guard.observed);
  if (!rows.length) return h("p", { class: "muted" }, "no limits to compare yet");
  const w = 420, rowH = 20, labelW = 170;
  const svg = s("svg", { width: w, height: rows.length * rowH + 4, role: "img", "aria-label": "guard" });
  rows.forEach(([name, limit], i) => {
    const value = guard.observed[name];
    const scale = Math.max(limit, value || 0) * 1.25 || 1;
    const y = i * rowH + 2, span = w - labelW - 70;
    const over = name.startsWith("min_") ? value !== null && value < limit : value !== null && value > limit;
    svg.append(s("text", { x: 0, y: y + 12 }, name));
    svg.append(s("rect", { x: labelW, y, width: Math.max(1, (span * (value || 0)) / scale), height: rowH - 6,
      fill: over ? "#d64545" : "#1f9d55", rx: 2 }));
    const lx = labelW + (span * limit) / scale;
    svg.append(s("line", { x1: lx, x2: lx, y1: y - 1, y2: y + rowH - 4, stroke: "#1d2330", "stroke-width": 2 }));
    svg.append(s("text", { x: labelW + span + 6, y: y + 12 }, `${fmt(value, 3)} / ${fmt(limit, 3)}`));
  });
  return svg;
}

// Per-arm outcome means with their 95% confidence intervals.
function ciChart(arms) {
  const rows = arms.filter((a) => a.outcome_mean !== null);
  if (!rows.length) return h("p", { class: "muted" }, "no outcomes recorded");
  const lows = rows.map((a) => (a.ci_low ?? a.outcome_mean)), highs = rows.map((a) => (a.ci_high ?? a.outcome_mean));
  let lo = Math.min(...lows), hi = Math.max(...highs);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const w = 460, rowH = 22, labelW = 80, span = w - labelW - 120;
  const x = (v) => labelW + (span * (v - lo)) / (hi - lo);
  const svg = s("svg", { width: w, height: rows.length * rowH + 4, role: "img", "aria-label": "outcomes" });
  rows.forEach((a, i) => {
    const y = i * rowH + 11, color = COLORS[i % COLORS.length];
    svg.append(s("text", { x: 0, y: y + 4 }, a.arm));
    svg.append(s("line", { x1: x(lows[i]), x2: x(highs[i]), y1: y, y2: y, stroke: color, "stroke-width": 3 }));
    svg.append(s("circle", { cx: x(a.outcome_mean), cy: y, r: 4, fill: color }));
    svg.append(s("text", { x: labelW + span + 6, y: y + 4 }, `${fmt(a.outcome_mean, 3)} (n=${a.outcomes})`));
  });
  return svg;
}

function stateKind(state) {
  if (["ready", "healthy", "running", "promoted"].includes(state)) return "ok";
  if (["rolled_back", "ejected", "closed", "failed"].includes(state)) return "bad";
  return "warn";
}

function renderSplit(sp) {
  const card = h("section", { class: "card split", "data-split": sp.model + (sp.label ? "/" + sp.label : "") });
  card.append(h("h2", {}, `split ${sp.model}${sp.label ? " / " + sp.label : ""} `, pill(sp.policy)));
  if (sp.weights) card.append(splitBar(sp.weights));
  card.append(table(["arm", "weight", "routed", "requests", "error rate", "p50 ms", "p99 ms"],
    sp.experiment.arms.map((a) => [a.arm, sp.weights ? pct(sp.weights[a.arm] ?? 0) : "by attribute",
      fmt(sp.routed[a.arm] ?? 0), fmt(a.requests), pct(a.error_rate), fmt(a.p50_ms), fmt(a.p99_ms)])));
  const c = sp.canary;
  if (c) {
    card.append(h("h3", {}, "canary"));
    const state = h("span", { class: "pill canary-state " + stateKind(c.state) }, c.state);
    const step = h("span", { class: "canary-step" }, String(c.step));
    card.append(h("p", {}, `${c.baseline} → ${c.candidate}: `, state, " step ", step,
      ` of ${c.steps.length - 1}, candidate weight `, h("span", { class: "canary-weight" }, pct(c.weight))));
    card.append(h("div", { class: "row" }, stepsChart(c), guardChart(c.guard)));
    card.append(h("p", { class: "muted" }, `guard numbers ${c.guard.observed_over}; each decision carries its step's own`));
    const decisions = c.decisions.slice().reverse();
    card.append(decisions.length
      ? table(["time", "action", "step", "weight", "reason", "numbers"], decisions.map((d) => [
        new Date(d.time * 1000).toLocaleTimeString(), d.action, d.step, pct(d.weight), d.reason,
        Object.entries(d.numbers).map(([k, v]) => `${k}=${fmt(v, 3)}`).join(" ")]))
      : h("p", { class: "muted decisions-none" }, "no decisions yet"));
  }
  const ex = sp.experiment;
  if (ex.arms.some((a) => a.outcomes > 0)) {
    card.append(h("h3", {}, "experiment"), ciChart(ex.arms));
  }
  card.append(h("p", { class: "verdict" }, ex.verdict));
  return card;
}

function renderPredictor(p) {
  const div = h("div", { class: "predictor", "data-predictor": p.name });
  div.append(h("h3", {}, `${p.label || "target"}: ${p.name} `, pill(p.state, stateKind(p.state)), ` ${p.device}`));
  div.append(h("p", {}, `queue ${fmt(p.queue_depth)} · in flight ${fmt(p.in_flight)} · completed ${fmt(p.completed)}`
    + ` · failed ${fmt(p.failed)} · batches ${fmt(p.batches)} · mean batch ${fmt(p.mean_batch_size, 1)}`));
  div.append(table(["replica", "state", "device", "p50 ms", "p99 ms", "batches", "requests", "failed batches", "ejections"],
    p.replicas.map((r) => [r.name, pill(r.state, stateKind(r.state)), r.device, fmt(r.p50_ms), fmt(r.p99_ms),
      fmt(r.batches), fmt(r.requests), fmt(r.failed_batches), fmt(r.ejections)])));
  const sizes = Object.entries(p.batch_sizes).map(([k, v]) => [k, v]);
  const reasons = Object.entries(p.dispatch_reasons);
  div.append(h("div", { class: "row" },
    h("div", {}, h("h3", {}, "batch sizes"), sizes.length ? bars(sizes.slice(-16), { label: "batch sizes" }) : h("p", { class: "muted" }, "no batches yet")),
    h("div", {}, h("h3", {}, "dispatch reasons"), reasons.length ? bars(reasons, { color: COLORS[1], label: "dispatch reasons" }) : h("p", { class: "muted" }, "–"))));
  return div;
}

function renderModel(m) {
  const card = h("section", { class: "card model", "data-model": m.name });
  card.append(h("h2", {}, h("span", { class: "model-name" }, m.name), " ", pill(m.ready ? "ready" : "not ready", m.ready ? "ok" : "bad"),
    m.versions.length ? ` versions ${m.versions.join(", ")}` : ""));
  const r = m.rates;
  card.append(h("div", { class: "row" }, sparkline(r.history),
    h("p", {}, h("b", { class: "rps" }, fmt(r.requests_per_s, 1)), " requests/s · ", h("b", {}, fmt(r.errors_per_s, 2)),
      " errors/s", h("br"), `over the last ${fmt(r.window_s, 0)} s · queue ${fmt(m.queue_depth)}`)));
  m.predictors.forEach((p) => card.append(renderPredictor(p)));
  return card;
}

function render(data) {
  refreshMs = 1000 * (data.refresh_s || 2);
  const ready = document.getElementById("ready");
  ready.textContent = data.ready ? "ready" : "not ready";
  ready.className = "pill " + (data.ready ? "ok" : "bad");
  document.getElementById("updated").textContent = new Date(data.time * 1000).toLocaleTimeString();
  document.getElementById("uptime").textContent = `${fmt(data.uptime_s, 0)} s`;
  document.getElementById("splits").replaceChildren(...data.splits.map(renderSplit));
  document.getElementById("models").replaceChildren(...data.models.map(renderModel));
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const response = await fetch("/v2/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    document.getElementById("error").textContent = "";
  } catch (err) {
    // A server that restarts or drains is expected: say so on the page, keep polling.
    document.getElementById("error").textContent = `cannot reach the server (${err.message}); retrying`;
  }
  setTimeout(poll, refreshMs);
}

poll();
