"use strict";
// The itmatch search page: no framework, no network beyond this server.
const $ = (id) => document.getElementById(id);

async function apiError(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string" && body.errors) return body.detail + ": " + body.errors.map((e) => e.msg).join("; ");
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function searchText(event) {
  event.preventDefault();
  const text = $("query").value.trim();
  $("text-error").textContent = "";
  if (!text) return;
  const response = await fetch("/search/text", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: text, k: 12 }),
  });
  const results = $("results");
  results.replaceChildren();
  if (!response.ok) { $("text-error").textContent = await apiError(response); return; }
  const body = await response.json();
  body.results.forEach((hit, rank) => {
    const fig = el("figure", { class: "result", "data-key": hit.key, "data-rank": String(rank + 1) });
    fig.appendChild(el("img", { src: hit.thumbnail, alt: hit.key }));
    const cap = el("figcaption");
    cap.appendChild(el("span", { class: "key", title: hit.key }, hit.key));
    cap.appendChild(el("span", { class: "score" }, hit.score.toFixed(3)));
    fig.appendChild(cap);
    results.appendChild(fig);
  });
  results.setAttribute("data-query", text);
}

async function searchImage(file) {
  $("image-error").textContent = "";
  $("captions").replaceChildren();
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file);
  form.append("k", "8");
  const response = await fetch("/search/image", { method: "POST", body: form });
  if (!response.ok) { $("image-error").textContent = await apiError(response); return; }
  const body = await response.json();
  for (const hit of body.results) {
    const li = el("li", { "data-key": hit.key });
    li.appendChild(el("span", { class: "score" }, hit.score.toFixed(3) + " "));
    li.appendChild(document.createTextNode(hit.caption));
    $("captions").appendChild(li);
  }
}

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => { if ($("file").files.length) searchImage($("file").files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) searchImage(e.dataTransfer.files[0]);
  });
}

async function showStatus() {
  try {
    const r = await fetch("/healthz");
    const h = await r.json();
    $("status").textContent = `${h.items.image} images, ${h.items.caption} captions, ${h.method} (${h.kind}), ${h.backend}`;
  } catch (_) { $("status").textContent = "server unreachable"; }
}

$("text-form").addEventListener("submit", searchText);
setupDrop();
showStatus();
