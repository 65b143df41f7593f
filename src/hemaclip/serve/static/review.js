// hemaclip review page: /api/review for the cells and counts; keyboard corrections POSTed one by one.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { data: null, cell: 0, field: 0, busy: false };

function headers(extra) { return TOKEN ? { ...extra, Authorization: `Bearer ${TOKEN}` } : extra; }
function show(el, visible) { el.hidden = !visible; }
function el(tag, content, cls) { const e = document.createElement(tag); if (content != null) e.textContent = content; if (cls) e.className = cls; return e; }
function pct(x) { return `${(100 * x).toFixed(1)}\u00a0%`; }

function fields() { return ["class", ...Object.keys(state.data.attribute_values)]; }
function choices(field) { return field === "class" ? state.data.classes : state.data.attribute_values[field]; }
function error(message) { $("review-error").textContent = message; show($("review-error"), !!message); }

function renderCounts(counts) {
  const body = $("counts").querySelector("tbody");
  body.replaceChildren();
  for (const [name, row] of Object.entries(counts.differential)) {
    const tr = el("tr");
    tr.dataset.class = name;
    tr.appendChild(el("td", name));
    tr.appendChild(el("td", String(row.count), "num count"));
    tr.appendChild(el("td", counts.white_cells ? pct(row.share) : "–", "num"));
    tr.appendChild(el("td", counts.white_cells ? `[${pct(row.low)}, ${pct(row.high)}]` : "–", "num"));
    body.appendChild(tr);
  }
  const outside = Object.entries(counts.outside_differential || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  $("counts-note").textContent = `${counts.white_cells} white cells of ${counts.cells}; ${counts.reviewed} reviewed, ` +
    `${counts.corrected} class corrections. ${counts.interval}.` + (outside ? ` Outside the differential: ${outside}.` : "");
}

function renderQueue() {
  const grid = $("queue");
  grid.replaceChildren(...state.data.queue.map((c, i) => {
    const card = el("div", null, "cell" + (i === state.cell ? " selected" : "") + (c.unfamiliar ? " unfamiliar" : "") + (c.reviewed ? " reviewed" : ""));
    card.dataset.id = String(c.id);
    const img = el("img");
    img.src = withToken(c.image_url);
    img.alt = `cell ${c.id}`;
    card.appendChild(img);
    card.appendChild(el("div", c.current.class, "label" + (c.current.class !== c.model_label ? " changed" : "")));
    card.appendChild(el("div", c.reason, "muted"));
    card.addEventListener("click", () => { state.cell = i; render(); });
    return card;
  }));
}

function renderDetail() {
  const c = state.data.queue[state.cell];
  if (!c) return;
  $("detail-name").textContent = `#${c.id} · ${c.name}`;
  $("detail-image").src = withToken(c.image_url);
  $("detail-reading").textContent = `model: ${c.model_label} (p = ${Number(c.probability).toFixed(2)}), runner-up ${c.runner_up}` +
    (c.unfamiliar ? ` · unfamiliar (score ${Number(c.unfamiliarity).toPrecision(3)})` : "");
  const body = $("fields").querySelector("tbody");
  body.replaceChildren();
  fields().forEach((f, j) => {
    const model = f === "class" ? c.model_label : c.model[f];
    const tr = el("tr", null, (j === state.field ? "active" : "") + (c.current[f] !== model ? " changed" : ""));
    tr.dataset.field = f;
    tr.appendChild(el("td", f.replaceAll("_", " ")));
    tr.appendChild(el("td", c.current[f], "value"));
    const td = el("td", null, "choices");
    choices(f).forEach((v, k) => td.appendChild(el("span", `${k + 1} ${v}`, v === c.current[f] ? "chosen" : "")));
    tr.appendChild(td);
    tr.addEventListener("click", () => { state.field = j; render(); });
    body.appendChild(tr);
  });
}

function render() { renderQueue(); renderDetail(); const sel = $("queue").querySelector(".selected"); if (sel) sel.scrollIntoView({ block: "nearest" }); }

async function load() {
  try {
    const response = await fetch(withToken("/api/review"), { headers: headers({}) });
    if (!response.ok) throw new Error((await response.json()).detail || `HTTP ${response.status}`);
    state.data = await response.json();
    renderCounts(state.data);
    if (state.data.warning) { $("review-warning").textContent = state.data.warning; show($("review-warning"), true); }
    $("status").textContent = `${state.data.cells} cells · model ${String(state.data.model_sha1).slice(0, 10)}` +
      (state.data.unfamiliar == null ? " · no familiarity file: nothing flagged unfamiliar" : ` · ${state.data.unfamiliar} unfamiliar`);
    render();
    document.body.dataset.ready = "1";
  } catch (err) {
    error(`Could not load the review: ${err.message}`);
  }
}

async function save(field, value, advance) {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { error("Type your name in the Reviewer box first: every correction records who made it."); $("reviewer").focus(); return; }
  const c = state.data.queue[state.cell];
  state.busy = true;
  $("status").textContent = "saving…";
  try {
    const response = await fetch(withToken(`/api/review/cells/${c.id}/corrections`), {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ field, value, reviewer }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    c.current = body.current;
    c.reviewed = true;
    renderCounts(body.counts);
    error("");
    $("status").textContent = `saved: cell #${c.id} ${field} = ${value} (correction ${body.correction.id})`;
    if (advance && state.cell + 1 < state.data.queue.length) state.cell += 1;
    render();
  } catch (err) {
    error(`Not saved: ${err.message}`);
    $("status").textContent = "";
  } finally {
    state.busy = false;
  }
}

function onKey(e) {
  if (!state.data || e.target === $("reviewer") || e.altKey || e.ctrlKey || e.metaKey) return;
  const f = fields()[state.field];
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    state.cell = Math.max(0, Math.min(state.data.queue.length - 1, state.cell + (e.key === "ArrowRight" ? 1 : -1)));
    state.field = 0;
  } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    state.field = Math.max(0, Math.min(fields().length - 1, state.field + (e.key === "ArrowDown" ? 1 : -1)));
  } else if (/^[1-9]$/.test(e.key)) {
    const value = choices(f)[Number(e.key) - 1];
    if (value === undefined || state.busy) return;
    e.preventDefault();
    save(f, value, f === "class");
    return;
  } else if (e.key === "Enter") {
    if (state.busy) return;
    e.preventDefault();
    save("class", state.data.queue[state.cell].current.class, true);
    return;
  } else {
    return;
  }
  e.preventDefault();
  render();
}

function setup() {
  const saved = localStorage.getItem("hemaclip-reviewer");
  if (saved) $("reviewer").value = saved;
  $("reviewer").addEventListener("change", () => localStorage.setItem("hemaclip-reviewer", $("reviewer").value.trim()));
  $("reviewer").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); $("reviewer").blur(); } });
  document.addEventListener("keydown", onKey);
  load();
}

setup();
