// fedlearn dashboard: polls /api/state and redraws. No libraries; charts are plain SVG.
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token");
const POLL_MS = Number(params.get("poll") || 1000);
const COLORS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285"];

const $ = (id) => document.getElementById(id);
function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(digits);

function lineChart(target, series, opts = {}) {
  target.replaceChildren();
  const points = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!points.length) { target.append(el("p", {class: "muted"}, opts.empty || "no data yet")); return; }
  const W = 600, H = 200, L = 48, R = 10, T = 10, B = 24;
  const xs = points.map((p) => p[0]);
  let ys = points.map((p) => p[1]);
  if (opts.limit !== undefined && opts.limit !== null) ys = ys.concat([opts.limit]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = opts.bars ? Math.min(0, ...ys) : Math.min(...ys), y1 = Math.max(...ys);
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"});
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.append(svgEl("line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eef1f5"}));
    const label = svgEl("text", {x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 12, fill: "#6b7585"});
    label.textContent = Math.abs(y1 - y0) < 0.1 ? y.toFixed(3) : y.toFixed(2);
    svg.append(label);
  }
  const xl = svgEl("text", {x: W - R, y: H - 6, "text-anchor": "end", "font-size": 12, fill: "#6b7585"});
  xl.textContent = `${UNIT} ${x1}`;
  svg.append(xl);
  if (opts.limit !== undefined && opts.limit !== null) {
    svg.append(svgEl("line", {x1: L, x2: W - R, y1: sy(opts.limit), y2: sy(opts.limit), stroke: "#c62828", "stroke-dasharray": "4 3"}));
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (!pts.length) return;
    const color = COLORS[i % COLORS.length];
    if (opts.bars) {
      const w = Math.max(2, (W - L - R) / Math.max(pts.length, 1) * 0.7);
      for (const [x, y] of pts) svg.append(svgEl("rect", {x: sx(x) - w / 2, y: sy(Math.max(y, y0)), width: w, height: Math.max(1, sy(y0) - sy(Math.max(y, y0))), fill: color}));
    } else {
      svg.append(svgEl("polyline", {points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none", stroke: color, "stroke-width": 2}));
    }
  });
  target.append(svg);
  const legend = el("div", {class: "legend"});
  series.forEach((s, i) => { const span = el("span", {}, `■ ${s.name}`); span.style.color = COLORS[i % COLORS.length]; legend.append(span); });
  if (opts.limit !== undefined && opts.limit !== null) { const b = el("span", {}, `-- budget ${opts.limit}`); b.style.color = "#c62828"; legend.append(b); }
  target.append(legend);
}

function metricSeries(rounds, names) {
  return names.filter((n) => rounds.some((r) => r.metrics[n] !== undefined && r.metrics[n] !== null))
    .map((n) => ({name: n, points: rounds.map((r) => [r.round, r.metrics[n] ?? null])}));
}

function fillTable(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) {
      const td = el("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = cell;
      tr.append(td);
    }
    return tr;
  }));
}

function card(label, value, id) {
  const c = el("div", {class: "card", id: id});
  c.append(el("div", {class: "label"}, label), el("div", {class: "value"}, value));
  return c;
}

let UNIT = "round";  // "step" for an asynchronous (FedBuff) run

function render(state) {
  UNIT = state.unit || "round";
  const rounds = state.rounds || [];
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  $("run").textContent = `${state.run_dir || ""}  ·  run ${(state.run_id || "").slice(0, 12)}  ·  ` +
    (state.asynchronous ? `FedBuff K ${state.asynchronous.buffer_size}, concurrency ${state.asynchronous.concurrency}, ` : "") +
    Object.entries(state.config || {}).filter(([, v]) => v !== null && v !== "" && v !== undefined).map(([k, v]) => `${k} ${v}`).join(", ");
  const live = state.live;
  const finished = live ? live.phase === "finished" : (state.total_rounds && last && last.round >= state.total_rounds);
  const status = $("status");
  status.textContent = finished ? "finished" : "live";
  status.className = "pill " + (finished ? "done" : "live");
  const eps = state.privacy && state.privacy.epsilon.length ? state.privacy.epsilon[state.privacy.epsilon.length - 1][1] : null;
  $("cards").replaceChildren(
    card(UNIT === "step" ? "server step" : "round", last ? `${last.round}${state.total_rounds ? " / " + state.total_rounds : ""}` : "0", "card-round"),
    card("test accuracy", last ? fmt(last.metrics.test_accuracy) : "–", "card-accuracy"),
    ...(UNIT === "step" ? [card("staleness", last ? `mean ${fmt(last.metrics.staleness_mean, 2)}, max ${fmt(last.metrics.staleness_max, 0)}` : "–", "card-staleness")] : []),
    card("flagged updates", String(state.flagged_total || 0), "card-flagged"),
    card("failures", String(state.failures_total || 0), "card-failures"),
    card("epsilon", eps === null ? "no DP" : `${fmt(eps, 3)}${state.privacy.budget ? " / " + state.privacy.budget : ""}`, "card-epsilon"),
    card("audit log", state.audit ? `${state.audit.size} records ${state.audit.ok ? "✓" : "✗"}` : "–", "card-audit"),
  );
  if (live) {
    $("live-section").hidden = false;
    const clients = live.connected_clients || [];
    $("live").replaceChildren(el("p", {}, `phase ${live.phase}, ${UNIT} ${live.round} of ${live.total_rounds}, ` +
      `${clients.length} connected: ${clients.join(", ") || "none"}, ${live.rejected_results || 0} results rejected`));
    for (const r of (live.rejections || []).slice().reverse()) {
      $("live").append(el("p", {class: "kind-rejected"}, `${UNIT} ${r.round}, client ${r.client}: ${r.reason}`));
    }
  }
  lineChart($("chart-accuracy"), metricSeries(rounds, ["test_accuracy", "fed_accuracy", "test_backdoor_success"]));
  lineChart($("chart-loss"), metricSeries(rounds, ["train_loss", "test_loss", "fed_loss"]));
  lineChart($("chart-seconds"), [{name: "seconds", points: rounds.map((r) => [r.round, r.seconds])}], {bars: true});
  lineChart($("chart-epsilon"), [{name: "epsilon", points: (state.privacy || {}).epsilon || []}],
            {limit: (state.privacy || {}).budget, empty: "no differential privacy in this run"});
  $("failures-count").textContent = `(${state.failures_total || 0}, newest first)`;
  fillTable($("failures"), (state.failures || []).map((f) => [String(f.round), f.client, el("span", {class: "kind-" + f.kind}, f.kind), f.reason]));
  fillTable($("rounds"), rounds.slice().reverse().slice(0, 200).map((r) => [String(r.round), String(r.participants),
    String(r.metrics.clients_failed ?? 0), fmt(r.seconds, 2), fmt(r.metrics.test_accuracy), fmt(r.metrics.test_loss)]));
  fillTable($("by-client"), (state.failures_by_client || []).map(([c, n]) => [c, String(n)]));
  const contributions = state.contributions || [];
  const methods = [...new Set(contributions.flatMap((row) => Object.keys(row).filter((k) => k !== "client")))].sort();
  const head = $("contributions").tHead;
  head.replaceChildren(el("tr"));
  head.rows[0].append(el("th", {}, "client"), ...methods.map((m) => el("th", {}, m)), el("th", {}, "rounds"));
  fillTable($("contributions"), contributions.map((row) => [row.client, ...methods.map((m) => row[m] ? fmt(row[m].total) : "–"),
    String(Math.max(...methods.map((m) => row[m] ? row[m].rounds : 0)))]));
  $("contributions-note").textContent = contributions.length ? "" : (state.contributions_note || "no contribution accounting in this run (--contributions gtg)");
  const audit = state.audit || {};
  const box = $("audit");
  box.replaceChildren(
    el("p", {class: audit.ok ? "ok" : "bad", id: "audit-state"}, audit.ok ? "verified: every record matches its signed head" : `NOT verified: ${(audit.problems || []).length} problem(s)`),
    el("p", {}, `size ${audit.size ?? 0}, signed head of size ${audit.head_size ?? 0}` + (audit.head_time ? ` at ${new Date(audit.head_time * 1000).toLocaleTimeString()}` : "")),
    el("p", {}, "root "), el("p", {}, "key "));
  box.children[2].append(el("code", {}, audit.root || ""));
  box.children[3].append(el("code", {}, audit.public_key || ""));
  for (const problem of audit.problems || []) box.append(el("p", {class: "bad"}, problem));
}

async function poll() {
  try {
    const response = await fetch("/api/state", {headers: token ? {Authorization: `Bearer ${token}`} : {}, cache: "no-store"});
    if (response.status === 401) throw new Error("operator token required: open this page as /?token=…");
    const state = await response.json();
    if (state.error) throw new Error(state.error);
    if (state.waiting) {
      $("status").textContent = "waiting for the run's first round";
      $("status").className = "pill";
    } else {
      render(state);
    }
  } catch (err) {
    const status = $("status");
    status.textContent = String(err.message || err);
    status.className = "pill error";
  }
  setTimeout(poll, POLL_MS);
}
poll();
