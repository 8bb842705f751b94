// The status page: polls /api/status every second and draws it; the buttons post control
// actions. A client key, when the router asks for one, is kept for this tab only.
"use strict";
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("cascade-key") || "";

function headers() {
  const h = { "content-type": "application/json" };
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const fmt = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");

function chart(points) {
  const w = 120, h = 28, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  const max = Math.max(1, ...points.map((p) => p.requests_per_s));
  const line = (cls, f) => {
    if (points.length < 2) return;
    const d = points.map((p, i) =>
      `${(i * w / (points.length - 1)).toFixed(1)},${(h - 1 - f(p) * (h - 2) / max).toFixed(1)}`);
    const pl = document.createElementNS(ns, "polyline");
    pl.setAttribute("class", cls); pl.setAttribute("points", d.join(" "));
    svg.append(pl);
  };
  line("rps", (p) => p.requests_per_s);
  line("err", (p) => p.failures_per_s);
  return svg;
}

async function act(name, action) {
  const r = await fetch(`/api/providers/${encodeURIComponent(name)}/control`,
    { method: "POST", headers: headers(), body: JSON.stringify({ action }) });
  if (!r.ok) show((await r.json()).error.message);
  refresh();
}

function row(p) {
  const buttons = el("td");
  const b = (label, action) => {
    const x = el("button", { type: "button", "data-action": action }, label);
    x.onclick = () => act(p.name, action);
    buttons.append(x);
  };
  if (p.order === "serve") { b("Disable", "disable"); b("Drain", "drain"); } else b("Enable", "enable");
  if (p.circuit !== "closed") b("Reset circuit", "reset_circuit");
  const kinds = p.errors_by_kind.map(([k, n]) => `${k} ${n}`).join(", ");
  const h = p.health;
  const health = !h ? "off" : (h.healthy ? "passing" : "failing") +
    (h.last_error ? ` (${h.last_error})` : h.last_took_ms !== null ? ` (${fmt(h.last_took_ms)} ms)` : "");
  return el("tr", { "data-provider": p.name, "data-state": p.state },
    el("td", {}, el("strong", {}, p.name), " ", el("span", { class: "models" },
      `${p.type}${p.endpoints > 1 ? ` × ${p.endpoints} endpoints` : ""} · ${p.models.join(", ")}` +
      (p.spent_usd_today > 0 ? ` · $${p.spent_usd_today.toFixed(4)} today` : ""))),
    el("td", {}, el("span", { class: "state " + p.state }, p.state.replace("_", " ")),
      p.order !== "serve" ? el("span", { class: "models" }, ` operator: ${p.order}`) : ""),
    el("td", { class: "n" }, fmt(p.requests_per_s)),
    el("td", { class: "n wrap", title: kinds }, pct(p.error_rate) + (kinds ? ` · ${kinds}` : "")),
    el("td", { class: "n" }, `${fmt(p.p50_ms)} / ${fmt(p.p99_ms)}`),
    el("td", { class: "n" }, `${p.in_flight} / ${p.concurrency_limit}${p.adaptive ? " (learned)" : ""}`),
    el("td", { class: "n" }, fmt(p.mean_batch_size)),
    el("td", { class: "wrap" }, health),
    el("td", {}, chart(p.history)),
    buttons);
}

function draw(s) {
  const c = s.cache;
  $("summary").textContent = `v${s.version} · ${s.in_flight} / ${s.max_in_flight} calls in flight` +
    (c ? ` · cache ${pct(c.hit_ratio)} hits, ${c.entries} entries, ${(c.bytes / 1024).toFixed(0)} KiB` : " · cache off") +
    ` · last ${s.window_s} s`;
  $("providers").tBodies[0].replaceChildren(...s.providers.map(row));
  const failures = s.recent_failures.map((f) => el("li", {},
    new Date(f.at_ms).toLocaleTimeString(), " ", el("span", { class: "k" }, f.provider + " " + f.kind),
    f.http_status ? ` HTTP ${f.http_status}` : "", f.error ? ` — ${f.error}` : ""));
  $("failures").replaceChildren(...(failures.length ? failures : [el("li", { class: "none" }, "none")]));
  const budgets = s.budgets.map((b) => el("li", { "data-budget": b.budget },
    el("span", { class: "k" }, b.budget), ` $${b.used_usd.toFixed(4)} of $${b.daily_usd.toFixed(2)} used, ` +
    `$${b.remaining_usd.toFixed(4)} left`));
  $("budgets").replaceChildren(...(budgets.length ? budgets : [el("li", { class: "none" }, "no budgets")]));
}

function show(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

async function refresh() {
  try {
    const r = await fetch("/api/status", { headers: headers(), cache: "no-store" });
    if (r.status === 401 || r.status === 403) {
      $("key").hidden = false;
      $("key-why").textContent = (await r.json()).error.message;
      return;
    }
    draw(await r.json());
    $("live").classList.remove("stale");
    show("");
  } catch (e) {
    $("live").classList.add("stale");
    show("the router did not answer: " + e);
  }
}

$("key").onsubmit = (e) => {
  e.preventDefault();
  key = $("key-input").value.trim();
  sessionStorage.setItem("cascade-key", key);
  $("key").hidden = true;
  refresh();
};

refresh();
setInterval(refresh, 1000);
