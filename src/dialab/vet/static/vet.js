// dialab vet: candidates page by page, keyboard labelling. State lives in the URL's query string.
"use strict";
const PAGE = 48;
const grid = document.getElementById("grid");
const form = document.getElementById("filters");
const status = document.getElementById("status");
let rows = [], current = 0, offset = 0, total = 0, differenceNames = {};

function params() {
  const p = new URLSearchParams();
  for (const el of form.elements) if (el.name && el.value !== "") p.set(el.name, el.value);
  return p;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "-";
  return typeof v === "number" ? Number(v.toPrecision(digits)).toString() : String(v);
}

function card(r, i) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.index = i;
  div.dataset.id = r.diaSourceId;
  const img = document.createElement("img");
  img.src = `/cutout/${encodeURIComponent(r.flavor)}/${r.diaSourceId}.png`;
  img.alt = `template, science and ${differenceNames[r.flavor] || "difference"} of diaSource ${r.diaSourceId}`;
  img.loading = "lazy";
  const facts = document.createElement("div");
  facts.className = "facts";
  const label = r.label ? `<span class="label ${r.label}">${r.label}</span>` : `<span class="label"></span>`;
  const expected = r.expected_snr !== null ? ` (expected S/N ${fmt(r.expected_snr)})` : "";
  const reliability = r.reliability !== null ? ` &middot; reliability ${fmt(r.reliability, 2)}` : "";
  facts.innerHTML = `${label}<b>${r.flavor}</b> ${r.band} visit ${r.visit} det ${r.detector} &middot; id ${r.diaSourceId}<br>
    S/N ${fmt(r.snr)} &middot; psfFlux ${fmt(r.psfFlux)} &plusmn; ${fmt(r.psfFluxErr, 2)} nJy &middot;
    <span class="kind-${r.kind.replace(" ", "-")}">${r.kind}${expected}</span>${reliability}<br>
    <span class="${r.good ? "" : "flagged"}">${r.good ? "passes the flag cut" : "flagged: " + r.flags}</span>
    ${r.isDipole ? " &middot; dipole" : ""} &middot; (${fmt(r.x, 5)}, ${fmt(r.y, 5)})`;
  div.append(img, facts);
  div.addEventListener("click", () => select(i));
  return div;
}

function select(i) {
  if (!rows.length) return;
  current = Math.max(0, Math.min(i, rows.length - 1));
  for (const el of grid.children) el.classList.toggle("current", Number(el.dataset.index) === current);
  grid.children[current].scrollIntoView({ block: "nearest" });
}

async function load(keepCurrent = false) {
  const p = params();
  p.set("offset", offset);
  p.set("limit", PAGE);
  history.replaceState(null, "", "?" + p.toString());
  const reply = await (await fetch("/api/candidates?" + p.toString())).json();
  rows = reply.rows; total = reply.total;
  grid.replaceChildren(...rows.map(card));
  document.getElementById("pageinfo").textContent =
    total ? `${offset + 1}-${offset + rows.length} of ${total} candidates` : "no candidates match";
  select(keepCurrent ? current : 0);
}

async function label(value) {
  const r = rows[current];
  if (!r) return;
  const reply = await fetch("/api/labels", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ flavor: r.flavor, diaSourceId: r.diaSourceId, label: value }),
  });
  const body = await reply.json();
  if (!reply.ok) { status.textContent = body.error; return; }
  r.label = value;
  const badge = grid.children[current].querySelector(".label");
  badge.className = `label ${value}`;
  badge.textContent = value;
  status.textContent = `${r.diaSourceId}: ${value} (saved ${body.labelledAt})`;
  if (current < rows.length - 1) select(current + 1);
}

function page(step) {
  const next = offset + step * PAGE;
  if (next < 0 || next >= total) return;
  offset = next;
  load();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const actions = { r: () => label("real"), b: () => label("bogus"), s: () => label("skip"),
    j: () => select(current + 1), ArrowRight: () => select(current + 1),
    k: () => select(current - 1), ArrowLeft: () => select(current - 1), n: () => page(1), p: () => page(-1) };
  if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
});
form.addEventListener("change", () => { offset = 0; load(); });
document.getElementById("next").addEventListener("click", () => page(1));
document.getElementById("prev").addEventListener("click", () => page(-1));

async function start() {
  const meta = await (await fetch("/api/meta")).json();
  differenceNames = meta.difference_names;
  document.getElementById("run").textContent = `${meta.run} (${meta.candidates} diaSources)`;
  const fill = (name, values) => {
    const select = form.elements[name];
    for (const v of values) select.add(new Option(v, v));
  };
  fill("flavor", meta.flavors); fill("band", meta.bands); fill("kind", meta.kinds);
  document.getElementById("reliability-filter").hidden = !meta.has_reliability;
  const given = new URLSearchParams(location.search);
  for (const el of form.elements) if (el.name && given.has(el.name)) el.value = given.get(el.name);
  offset = Number(given.get("offset") || 0);
  load();
}
start();
