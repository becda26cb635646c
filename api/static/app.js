// Sleuth web page: plain JavaScript. The API key lives in sessionStorage and goes in the Authorization header.
"use strict";
const KEY = "sleuthApiKey";
const $ = (id) => document.getElementById(id);

function apiKey() { return sessionStorage.getItem(KEY) || ""; }
function showKeyState() {
  const key = apiKey();
  $("key-state").textContent = key ? `Using key ${key.split("_")[1] || ""} for this tab.` : "No key yet.";
}
function setStatus(text) { $("status").textContent = text; }
function setError(text) { const e = $("error"); e.hidden = !text; e.textContent = text || ""; }

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

async function search(event) {
  event.preventDefault();
  setError("");
  if (!apiKey()) { setError("Enter an API key first."); return; }
  const file = $("file").files[0];
  if (!file) { setError("Choose an image."); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("refine", $("refine").checked ? "true" : "false");
  $("search-button").disabled = true;
  $("report-section").hidden = true;
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

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  showKeyState();
});
$("search-form").addEventListener("submit", search);
showKeyState();
