// featcache's search page: no framework, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let indexes = [];

function token() { return sessionStorage.getItem("featcache-token") || ""; }

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...headers() } });
  if (response.status === 401) {
    $("token-box").hidden = false;
    throw new Error("this service needs a token: enter it above");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadIndexes() {
  try {
    indexes = await (await api("/indexes")).json();
  } catch (e) {
    status(e.message, true);
    return;
  }
  $("index").replaceChildren(...indexes.map((ix) => new Option(`${ix.name} (${ix.rows.toLocaleString()} rows)`, ix.name)));
  showDomains();
  status(indexes.length ? "Ready." : "No index is served.");
}

function showDomains() {
  const chosen = indexes.find((ix) => ix.name === $("index").value);
  const names = chosen ? chosen.domains : [];
  $("domain").replaceChildren(new Option("all", ""), ...names.map((d) => new Option(d, d)));
}

let objectURLs = [];  // made for the shown query and thumbnails; freed when the next search replaces them

function objectURL(blob) {
  const url = URL.createObjectURL(blob);
  objectURLs.push(url);
  return url;
}

function freeObjectURLs() {
  objectURLs.forEach((url) => URL.revokeObjectURL(url));
  objectURLs = [];
}

async function thumbnail(img, url) {
  if (!token()) { img.src = url; return; }  // an <img> cannot send a header: fetch it with the token
  try { img.src = objectURL(await (await api(url)).blob()); } catch (e) { img.alt = e.message; }
}

function render(answer) {
  const items = answer.neighbours.map((n, rank) => {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.row = n.row;
    li.dataset.testid = "result";
    li.title = `${n.path}\nclick to search by this image`;
    const img = document.createElement("img");
    img.alt = n.path;
    thumbnail(img, n.image);
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = n.label;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.append(`#${rank + 1} · `, Object.assign(document.createElement("span"), { className: "domain", textContent: n.domain }),
                " · ", Object.assign(document.createElement("span"), { className: "score", textContent: n.score.toFixed(4) }));
    li.append(img, label, meta);
    li.addEventListener("click", () => searchRow(answer.index, n.row, n.image));
    return li;
  });
  $("results").replaceChildren(...items);
  status(`${answer.neighbours.length} neighbours in ${answer.index} (${answer.took_ms} ms).`);
}

function fields() {
  return { index: $("index").value, k: $("k").value || "10", domain: $("domain").value };
}

async function searchFile(file) {
  if (!file) return;
  freeObjectURLs();
  $("query").src = objectURL(file);
  $("query").hidden = false;
  const form = new FormData();
  form.append("image", file);
  for (const [key, value] of Object.entries(fields())) if (value) form.append(key, value);
  status("Searching...");
  try { render(await (await api("/search", { method: "POST", body: form })).json()); } catch (e) { status(e.message, true); }
}

async function searchRow(index, row, image) {
  freeObjectURLs();  // images already shown stay on screen until the new results replace them
  thumbnail($("query"), image);
  $("query").hidden = false;
  const body = { ...fields(), index, row, k: Number(fields().k) };
  if (!body.domain) delete body.domain;
  status("Searching...");
  try {
    render(await (await api("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })).json());
  } catch (e) { status(e.message, true); }
}

$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
$("index").addEventListener("change", showDomains);
$("token").addEventListener("change", (e) => { sessionStorage.setItem("featcache-token", e.target.value); loadIndexes(); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); searchFile(e.dataTransfer.files[0]); });
loadIndexes();
