// hemaclip page: upload/drop a cell image -> /api/describe; text box -> /api/search. No build step.
"use strict";

const $ = (id) => document.getElementById(id);

function show(el, visible) { el.hidden = !visible; }

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    return JSON.stringify(body.detail || body);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function cellCard(hit) {
  const card = document.createElement("div");
  card.className = "cell";
  if (hit.image_url) {
    const img = document.createElement("img");
    img.src = withToken(hit.image_url);
    img.alt = hit.label || "reference cell";
    img.loading = "lazy";
    card.appendChild(img);
  }
  card.appendChild(text("div", hit.label || "?", "label"));
  card.appendChild(text("div", `similarity ${Number(hit.score).toFixed(3)}`, "muted"));
  if (hit.name) card.appendChild(text("div", hit.name, "muted"));
  const attrs = hit.attributes ? Object.entries(hit.attributes) : [];
  if (attrs.length) card.title = attrs.map(([k, v]) => `${k}: ${v}`).join("\n");
  return card;
}

const SVG = "http://www.w3.org/2000/svg";

// Boxes of every white cell found in the upload, drawn over the preview; a click reads that cell.
function drawBoxes(response, selected) {
  const svg = $("boxes");
  svg.replaceChildren();
  const cells = response.cells || [];
  const [w, h] = response.image_size || [1, 1];
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  cells.forEach((c, i) => {
    if (!c.box || c.cell_found === false) return;
    const [x0, y0, x1, y1] = c.box;
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", x0); rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0); rect.setAttribute("height", y1 - y0);
    rect.setAttribute("class", "cell-box" + (i === selected ? " selected" : "") + (c.unfamiliar ? " unfamiliar" : ""));
    rect.dataset.cell = String(i);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `cell ${i + 1}: ${c.label} (p = ${Number(c.probability).toFixed(2)})` + (c.unfamiliar ? ", unfamiliar" : "");
    rect.appendChild(title);
    rect.addEventListener("click", () => renderResponse(response, i));
    svg.appendChild(rect);
  });
  const found = cells.filter((c) => c.cell_found !== false).length;
  $("cell-count").textContent = found ? `(${found} white cell${found === 1 ? "" : "s"} found; click a box to read it)` : "(no white cell found: the whole picture was read)";
}

function renderResponse(response, index) {
  const cells = response.cells && response.cells.length ? response.cells : [response];
  const d = { ...cells[index], saliency_png: index === 0 ? response.saliency_png : null };
  drawBoxes(response, index);
  renderDescription(d);
}

function renderDescription(d) {
  const unfamiliar = $("unfamiliar");
  unfamiliar.textContent = d.unfamiliar
    ? `Unfamiliar image (score ${Number(d.unfamiliarity).toPrecision(3)}): it lies outside what the model was trained on; the reading may be wrong.`
    : "";
  show(unfamiliar, !!d.unfamiliar);
  $("class-label").textContent = d.label;
  $("class-prob").textContent = d.probability != null ? `(p = ${d.probability.toFixed(2)})` : "";
  $("runner-up").textContent = d.runner_up ? `runner-up: ${d.runner_up} (p = ${Number(d.runner_up_probability).toFixed(2)})` : "";
  show($("abstain"), !!d.abstain);
  show($("calibration"), d.calibrated === false);
  $("sentence").textContent = d.sentence || "";
  const body = $("attribute-table").querySelector("tbody");
  body.replaceChildren();
  for (const [name, a] of Object.entries(d.attributes || {})) {
    const row = document.createElement("tr");
    if (!a.stated) row.className = "unstated";
    row.appendChild(text("td", name.replaceAll("_", " ")));
    row.appendChild(text("td", a.value));
    row.appendChild(text("td", Number(a.probability).toFixed(2), "num"));
    row.appendChild(text("td", a.stated ? "yes" : "no"));
    body.appendChild(row);
  }
  const grid = $("neighbours");
  grid.replaceChildren(...(d.neighbours || []).map(cellCard));
  if (d.saliency_png) {
    $("saliency").src = d.saliency_png;
    show($("saliency-figure"), true);
  } else {
    show($("saliency-figure"), false);
  }
  show($("result"), true);
}

async function describe(file) {
  show($("describe-error"), false);
  show($("result"), false);
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  show($("describe-busy"), true);
  try {
    const response = await fetch(withToken("/api/describe"), {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name || "upload") },
      body: file,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    renderResponse(await response.json(), 0);
  } catch (err) {
    $("describe-error").textContent = `Could not describe ${file.name}: ${err.message}`;
    show($("describe-error"), true);
  } finally {
    show($("describe-busy"), false);
  }
}

async function search(event) {
  if (event) event.preventDefault();
  show($("search-error"), false);
  const q = $("search-query").value.trim();
  if (!q) {
    $("search-error").textContent = "Type a description first.";
    show($("search-error"), true);
    return;
  }
  const params = new URLSearchParams({ q, k: $("search-k").value || "12" });
  const where = $("search-where").value.trim();
  if (where) params.append("where", where);
  $("search-summary").textContent = "searching…";
  try {
    const response = await fetch(withToken(`/api/search?${params}`));
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    $("search-results").replaceChildren(...body.hits.map(cellCard));
    $("search-summary").textContent = `${body.hits.length} cells for “${body.query}”` + (where ? ` where ${where}` : "");
  } catch (err) {
    $("search-summary").textContent = "";
    $("search-results").replaceChildren();
    $("search-error").textContent = err.message;
    show($("search-error"), true);
  }
}

async function health() {
  try {
    const response = await fetch(withToken("/api/health"));
    const h = await response.json();
    const parts = [];
    if (h.model) parts.push(`model: ${h.model.image_tower} at ${h.model.image_size} px`);
    if (h.index) parts.push(`index: ${h.index.count} reference cells`);
    if (!h.describe) parts.push("describe unavailable");
    if (!h.search) parts.push("search unavailable");
    $("status").textContent = parts.join(" · ");
  } catch (err) {
    $("status").textContent = "server not reachable";
  }
}

function setup() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (e) => describe(e.target.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) describe(e.dataTransfer.files[0]);
  });
  $("search-form").addEventListener("submit", search);
  health();
}

setup();
