// Sleuth web page: plain JavaScript. The API key lives in sessionStorage and goes in the Authorization header.
// Views (hash routes): #/ search, #/report/ID a past report, #/history past searches, #/collections and
// #/collections/ID a collection's thumbnail grid. Everything shown comes from /v1; text goes in by textContent.
"use strict";
const KEY = "sleuthApiKey";
const PAGE = { history: 20, grid: 48 };
const $ = (id) => document.getElementById(id);

function apiKey() { return sessionStorage.getItem(KEY) || ""; }
function showKeyState() {
  const key = apiKey();
  $("key-state").textContent = key ? `Using key ${key.split("_")[1] || ""} for this tab.` : "No key yet.";
}
function setStatus(text) { $("status").textContent = text; }
function setError(text) { const e = $("error"); e.hidden = !text; e.textContent = text || ""; }
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${apiKey()}` }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok && response.status !== 202) {
    let message = `HTTP ${response.status}`;
    try { const body = await response.json(); message = body.message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitForJob(url) {
  for (;;) {
    const job = await (await api(url)).json();
    const progress = job.progress && job.progress.stage ? ` (${job.progress.stage})` : "";
    setStatus(`Job ${job.status}${progress}…`);
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(`the job failed: ${job.error}`);
    await sleep(1000);
  }
}

async function showReport(reportId) {
  const html = await (await api(`/v1/reports/${reportId}?format=html`)).text();
  const json = await (await api(`/v1/reports/${reportId}`)).blob();
  $("report-json").href = URL.createObjectURL(json);
  $("report-json").download = `sleuth-report-${reportId}.json`;
  $("report-id").textContent = `Report ${reportId}`;
  const frame = $("report-frame");
  frame.onload = () => { frame.style.height = `${frame.contentDocument.documentElement.scrollHeight + 20}px`; };
  frame.srcdoc = html;
  $("report-section").hidden = false;
  setStatus("Report ready.");
}

// --- search: filters, region, text ----------------------------------------------------------------
function filterFields() {
  const fields = { collection: $("f-collection").value.trim(), label: $("f-label").value,
    first_seen_from: $("f-from").value, first_seen_to: $("f-to").value, sort: $("f-sort").value };
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v && v !== "relevance"));
}

const crop = { region: null, start: null };

function showCropImage() {
  const file = $("file").files[0];
  crop.region = null;
  $("crop-box").hidden = true;
  $("crop-state").textContent = "Drag on the image to search only a region of it.";
  $("crop-area").hidden = !file;
  if (file) $("crop-image").src = URL.createObjectURL(file);
}

function cropPoint(event) {
  const rect = $("crop-image").getBoundingClientRect();
  return { x: Math.min(Math.max(event.clientX - rect.left, 0), rect.width),
    y: Math.min(Math.max(event.clientY - rect.top, 0), rect.height) };
}

function drawCrop(a, b) {
  const box = $("crop-box");
  const left = Math.min(a.x, b.x), top = Math.min(a.y, b.y);
  Object.assign(box.style, { left: `${left}px`, top: `${top}px`, width: `${Math.abs(a.x - b.x)}px`,
    height: `${Math.abs(a.y - b.y)}px` });
  box.hidden = false;
  return { left, top, width: Math.abs(a.x - b.x), height: Math.abs(a.y - b.y) };
}

function endCrop(event) {
  if (!crop.start) return;
  const shown = drawCrop(crop.start, cropPoint(event));
  crop.start = null;
  const img = $("crop-image");
  const scale = img.naturalWidth / img.getBoundingClientRect().width;  // region in the image's own pixels
  const r = [shown.left, shown.top, shown.width, shown.height].map((v) => Math.round(v * scale));
  if (r[2] < 16 || r[3] < 16) { clearCrop(); return; }
  crop.region = r.join(",");
  $("crop-state").textContent = `Searching the region ${r[2]}×${r[3]} at (${r[0]}, ${r[1]}) only.`;
}

function clearCrop() {
  crop.region = null;
  $("crop-box").hidden = true;
  $("crop-state").textContent = "Drag on the image to search only a region of it.";
}

async function search(event) {
  event.preventDefault();
  setError("");
  if (!apiKey()) { setError("Enter an API key first."); return; }
  const file = $("file").files[0];
  if (!file) { setError("Choose an image."); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("refine", $("refine").checked ? "true" : "false");
  for (const [name, value] of Object.entries(filterFields())) form.append(name, value);
  if (crop.region) form.append("region", crop.region);
  $("search-button").disabled = true;
  $("report-section").hidden = true;
  $("text-section").hidden = true;
  try {
    setStatus("Uploading and searching…");
    const response = await api("/v1/searches", { method: "POST", body: form });
    const body = await response.json();
    if (response.status === 202) await waitForJob(body.job_url);
    await showReport(body.report_id);
  } catch (error) {
    setStatus("");
    setError(error.message);
  } finally {
    $("search-button").disabled = false;
  }
}

function tile(thumbnail, alt, lines) {
  const img = el("img", { alt, loading: "lazy" });
  if (thumbnail) img.src = thumbnail;
  return el("figure", { className: "tile" }, img, el("figcaption", {}, ...lines.map((l) => el("div", { textContent: l }))));
}

async function textSearch(event) {
  event.preventDefault();
  setError("");
  const text = $("text-query").value.trim();
  if (!apiKey()) { setError("Enter an API key first."); return; }
  if (!text) { setError("Type a description first."); return; }
  $("report-section").hidden = true;
  try {
    setStatus("Searching by text…");
    const body = JSON.stringify(Object.assign({ text }, filterFields()));
    const result = await (await api("/v1/text-searches", {
      method: "POST", body, headers: { "Content-Type": "application/json" } })).json();
    $("text-title").textContent = `Nearest to “${text}” (${result.hits.length})`;
    $("text-grid").replaceChildren(...result.hits.map((h) => tile(h.thumbnail, `image ${h.image_id}`, [
      `image ${h.image_id} · ${h.label || "unknown"}`, (h.why || [])[0] || "",
      (h.sightings[0] && (h.sightings[0].page_url || h.sightings[0].url || h.sightings[0].source_key)) || ""])));
    $("text-section").hidden = false;
    setStatus(result.hits.length ? "Text results ready: look-alikes to inspect, never evidence of a copy." : "Nothing found.");
  } catch (error) {
    setStatus("");
    setError(error.message);
  }
}

// --- history -----------------------------------------------------------------------------------------
let historyOffset = 0;

async function showHistory(offset = 0) {
  if (!apiKey()) { setError("Enter an API key first."); return; }
  historyOffset = Math.max(0, offset);
  const page = await (await api(`/v1/reports?limit=${PAGE.history}&offset=${historyOffset}&thumbnails=true`)).json();
  $("history-rows").replaceChildren(...page.items.map((r) => {
    const img = el("img", { alt: `query of report ${r.id}`, className: "thumb" });
    if (r.thumbnail) img.src = r.thumbnail;
    const hits = Object.entries(r.hits).filter(([, n]) => n).map(([cls, n]) => `${n} ${cls.replace("_", " ")}`);
    const open = el("a", { href: `#/report/${r.id}`, textContent: "Open", className: "open-report" });
    return el("tr", { className: "history-row" }, el("td", {}, img), el("td", { textContent: r.created_at.slice(0, 19).replace("T", " ") }),
      el("td", {}, el("span", { className: `badge ${r.verdict.kind}`, textContent: r.verdict.kind.replaceAll("_", " ") }),
        el("div", { textContent: r.verdict.summary }), r.status !== "done" ? el("div", { className: "muted", textContent: `status: ${r.status}` }) : ""),
      el("td", { textContent: hits.join(", ") || "none" }), el("td", {}, open));
  }));
  const last = historyOffset + page.items.length;
  $("history-page").textContent = page.total ? `${historyOffset + 1}–${last} of ${page.total}` : "No searches yet.";
  $("history-newer").disabled = historyOffset === 0;
  $("history-older").disabled = !page.next;
}

// --- collections -------------------------------------------------------------------------------------
const grid = { id: null, offset: 0 };

async function showCollections() {
  if (!apiKey()) { setError("Enter an API key first."); return; }
  const collections = await (await api("/v1/collections")).json();
  $("collection-list").replaceChildren(...collections.map((c) => el("li", {},
    el("a", { href: `#/collections/${c.id}`, textContent: c.name, className: "collection-link" }),
    el("span", { className: "muted", textContent: ` ${c.images} image(s)` }))));
  $("collection-names").replaceChildren(...collections.map((c) => el("option", { value: c.name })));
}

async function showGrid(id, offset = 0) {
  grid.id = id;
  grid.offset = Math.max(0, offset);
  const params = new URLSearchParams({ limit: PAGE.grid, offset: grid.offset, thumbnails: "true" });
  for (const [name, field] of [["label", "g-label"], ["generator", "g-generator"], ["first_seen_from", "g-from"],
    ["first_seen_to", "g-to"], ["sort", "g-sort"]]) {
    const value = $(field).value.trim();
    if (value && value !== "ingested") params.set(name, value);
  }
  const page = await (await api(`/v1/collections/${id}/images?${params}`)).json();
  $("collection-title").textContent = `${page.collection.name}: ${page.total} image(s)`;
  $("collection-grid").replaceChildren(...page.items.map((i) => tile(i.thumbnail, `image ${i.image_id}`, [
    `image ${i.image_id} · ${i.label}${i.generator ? ` (${i.generator})` : ""}`,
    i.first_seen ? `first seen ${i.first_seen.slice(0, 10)}` : "first seen: not stated",
    i.page_url || i.url || i.source_key || ""])));
  const last = grid.offset + page.items.length;
  $("grid-page").textContent = page.total ? `${grid.offset + 1}–${last} of ${page.total}` : "No image matches.";
  $("grid-prev").disabled = grid.offset === 0;
  $("grid-next").disabled = !page.next;
  $("collection-section").hidden = false;
}

// --- routing -----------------------------------------------------------------------------------------
async function route() {
  setError("");
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const view = parts[0] === "history" ? "history" : parts[0] === "collections" ? "collections" : "search";
  for (const name of ["search", "history", "collections"]) {
    $(`view-${name}`).hidden = name !== view;
    $(`nav-${name}`).classList.toggle("active", name === view);
  }
  try {
    if (view === "history") await showHistory(0);
    if (view === "collections") {
      await showCollections();
      if (parts[1]) await showGrid(parts[1], 0); else $("collection-section").hidden = true;
    }
    if (view === "search" && parts[0] === "report" && parts[1]) {
      if (!apiKey()) { setError("Enter an API key first."); return; }
      $("report-section").hidden = true;
      $("text-section").hidden = true;
      await showReport(parts[1]);
    }
  } catch (error) {
    setError(error.message);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  showKeyState();
  route();
});
$("search-form").addEventListener("submit", search);
$("text-form").addEventListener("submit", textSearch);
$("file").addEventListener("change", showCropImage);
$("crop-image").addEventListener("pointerdown", (event) => { event.preventDefault(); crop.start = cropPoint(event); });
window.addEventListener("pointermove", (event) => { if (crop.start) drawCrop(crop.start, cropPoint(event)); });
window.addEventListener("pointerup", endCrop);
$("crop-clear").addEventListener("click", clearCrop);
$("history-newer").addEventListener("click", () => showHistory(historyOffset - PAGE.history).catch((e) => setError(e.message)));
$("history-older").addEventListener("click", () => showHistory(historyOffset + PAGE.history).catch((e) => setError(e.message)));
$("grid-filters").addEventListener("submit", (event) => { event.preventDefault(); showGrid(grid.id, 0).catch((e) => setError(e.message)); });
$("grid-prev").addEventListener("click", () => showGrid(grid.id, grid.offset - PAGE.grid).catch((e) => setError(e.message)));
$("grid-next").addEventListener("click", () => showGrid(grid.id, grid.offset + PAGE.grid).catch((e) => setError(e.message)));
window.addEventListener("hashchange", route);
showKeyState();
route();
