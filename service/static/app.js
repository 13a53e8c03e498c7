"use strict";
// The page talks to the same HTTP API as any client. Media are fetched with the key and shown from blob URLs
// (an <img src> cannot send the key). A video opened with no key typed plays from its media URL instead, so the
// browser streams it with HTTP range requests (a long video starts at once and seeks to a moment).

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#key");
keyInput.value = localStorage.getItem("uniadapter-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("uniadapter-key", keyInput.value); refreshAll(); });

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function failure(r) {
  let detail = r.status + " " + r.statusText;
  try { const body = await r.json(); if (body.detail) detail = r.status + ": " + body.detail; } catch (e) { /* not JSON */ }
  return new Error(detail);
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  if (!r.ok) throw await failure(r);
  return r.status === 204 ? null : r.json();
}

async function blobUrl(path) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw await failure(r);
  return URL.createObjectURL(await r.blob());
}

function guard(fn) {
  return async (event) => {
    if (event) event.preventDefault();
    showError("");
    try { await fn(event); } catch (e) { showError(e.message); }
  };
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children || []) node.append(c);
  return node;
}

// -- tabs ---------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
    if (tab.dataset.tab === "adapters") guard(loadAdapters)();
    if (tab.dataset.tab === "collections") guard(loadCollections)();
  });
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

// -- search -------------------------------------------------------------------------------------------
let collections = [];

// Seconds -> "m:ss" ("h:mm:ss" from an hour); a range "1:04–1:12".
function clock(s) {
  const t = Math.max(0, Math.floor(s + 1e-6));
  const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), sec = String(t % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}
const span = (hit) => `${clock(hit.start_s)}–${clock(hit.end_s)}`;
const kindLabel = (c) => c.moments ? `${c.kind}, moments of ${c.moments.window_s} s every ${c.moments.stride_s} s` : c.kind;

function chosenCollection() {
  return collections.find((c) => c.name === $("#search-collection").value);
}

function showGroupToggle() {
  $("#search-group-label").hidden = !chosenCollection()?.moments;
}
$("#search-collection").addEventListener("change", showGroupToggle);

async function loadCollectionPicker() {
  collections = await api("/collections");
  const picker = $("#search-collection");
  const chosen = picker.value;
  picker.replaceChildren(...collections.map((c) => el("option", { value: c.name, text: `${c.name} (${c.moments ? "video moments" : c.kind}, ${c.items})` })));
  if (chosen && collections.some((c) => c.name === chosen)) picker.value = chosen;
  showGroupToggle();
}

$("#search-form").addEventListener("submit", guard(async () => {
  const body = { collection: $("#search-collection").value, top_k: Number($("#search-k").value) || 12 };
  const file = $("#search-file").files[0];
  const text = $("#search-text").value.trim();
  if (file) body[file.type.startsWith("video/") ? "query_video" : "query_image"] = await fileToBase64(file);
  else if (text) body.query_text = text;
  else throw new Error("type a query or choose an image or video");
  const caption = $("#search-filter").value.trim();
  if (caption) body.filter = { caption_contains: caption };
  if (chosenCollection()?.moments) body.group_by_item = $("#search-group").checked;
  const out = await api("/retrieve", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const grid = $("#results");
  grid.replaceChildren();
  for (const hit of out.results) {
    const moment = hit.start_s !== null && hit.start_s !== undefined;
    const img = el("img", { alt: moment ? `${hit.id}, ${span(hit)}` : hit.id });
    const open = guard(() => openHit(hit));
    const card = el("div", { class: "hit", "data-id": hit.id, title: hit.metadata.caption || hit.metadata.text || hit.id,
                             role: "button", tabindex: "0", onclick: open,
                             onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") open(e); } }, [
      img, el("div", { class: "score", text: hit.score.toFixed(3) + " · " + hit.id }),
      ...(moment ? [el("div", { class: "when", text: span(hit) })] : []),
      el("div", { class: "cap", text: hit.metadata.caption || hit.metadata.text || "" })]);
    if (moment) Object.assign(card.dataset, { moment: hit.moment, start: hit.start_s, end: hit.end_s });
    grid.append(card);
    if (hit.thumbnail_url) blobUrl(hit.thumbnail_url).then((u) => { img.src = u; }, (e) => showError(e.message));
  }
  if (!out.results.length) grid.append(el("p", { class: "hint", text: "no hits" }));
}));

// A moment hit's media_url ends in a media fragment (#t=start,end): the player starts at the moment and pauses at
// its end (no loop); the controls play on from there.
async function openHit(hit) {
  const box = $("#viewer-media");
  box.replaceChildren();
  const moment = hit.start_s !== null && hit.start_s !== undefined;
  const when = $("#viewer-when");
  when.hidden = !moment;
  when.textContent = moment ? `moment ${hit.moment}: ${span(hit)}` : "";
  const shown = { id: hit.id, score: hit.score, ...(moment ? { moment: hit.moment, start_s: hit.start_s, end_s: hit.end_s } : {}), ...hit.metadata };
  $("#viewer-meta").textContent = JSON.stringify(shown, null, 2);
  if (hit.media_url) {
    const [path, fragment] = hit.media_url.split("#");
    const info = await api(path.replace(/\/media$/, ""));
    if (info.kind === "video") {
      // no key typed: the media URL itself (range requests); a key: the whole file fetched with it, as a blob
      const src = (keyInput.value ? await blobUrl(path) : path) + (fragment ? "#" + fragment : "");
      box.append(el("video", { src, controls: "", autoplay: "", muted: "", id: "viewer-full", ...(moment ? {} : { loop: "" }) }));
    } else {
      box.append(el("img", { src: await blobUrl(path), alt: hit.id, id: "viewer-full" }));
    }
  }
  $("#viewer").showModal();
}
$("#viewer").addEventListener("close", () => {
  const media = $("#viewer-full");
  if (media && media.tagName === "VIDEO") media.pause();
});

// -- ask ----------------------------------------------------------------------------------------------
let askFile = null;

function setAskFile(file) {
  askFile = file;
  const url = URL.createObjectURL(file);
  $("#ask-preview").replaceChildren(file.type.startsWith("video/")
    ? el("video", { src: url, controls: "", muted: "", loop: "", autoplay: "" }) : el("img", { src: url, alt: file.name }));
}

const drop = $("#ask-drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) setAskFile(e.dataTransfer.files[0]); });
$("#ask-file").addEventListener("change", (e) => { if (e.target.files[0]) setAskFile(e.target.files[0]); });

$("#ask-form").addEventListener("submit", guard(async () => {
  if (!askFile) throw new Error("drop an image or a video first");
  const video = askFile.type.startsWith("video/");
  const form = new FormData();
  form.append(video ? "video" : "image", askFile, askFile.name);
  form.append("question", $("#ask-question").value);
  form.append("top_k", "5");
  $("#answer").replaceChildren(el("p", { class: "hint", text: "thinking..." }));
  const out = await api(video ? "/videoqa" : "/vqa", { method: "POST", body: form });
  $("#answer").replaceChildren(
    el("div", { class: "best", id: "answer-text", text: out.answer }),
    el("ol", {}, out.alternatives.map((a) => el("li", { text: `${a.answer} (${a.score.toFixed(2)})` }))),
    el("p", { class: "hint", text: "by " + (out.adapter || "the bare backbone") }));
}));

// -- adapters -----------------------------------------------------------------------------------------
async function adapterAction(ref, action) {
  await api(`/adapters/${encodeURIComponent(ref)}/${action}`, { method: "POST" });
  await loadAdapters();
}

async function loadAdapters() {
  const out = await api("/adapters");
  const rows = out.adapters.map((a) => el("tr", { "data-ref": a.ref }, [
    el("td", { text: a.ref }), el("td", { text: a.task }), el("td", { text: a.resident ? "yes" : "no" }),
    el("td", { text: a.pinned ? "yes" : "no" }), el("td", { text: a.bytes.toLocaleString() }),
    el("td", { text: a.percent_of_backbone.toFixed(2) }),
    el("td", {}, [
      el("button", { text: a.resident ? "unload" : "load", onclick: guard(() => adapterAction(a.ref, a.resident ? "unload" : "load")) }),
      el("button", { text: a.pinned ? "unpin" : "pin", onclick: guard(() => adapterAction(a.ref, a.pinned ? "unpin" : "pin")) })]),
  ]));
  $("#adapter-table tbody").replaceChildren(...rows);
  $("#adapter-budget").textContent = `device: ${out.device_bytes.toLocaleString()} of ${out.device_budget_bytes.toLocaleString()} bytes; ` +
    `CPU copies: ${out.cpu_bytes.toLocaleString()} of ${out.cpu_budget_bytes.toLocaleString()} bytes`;
}

// -- collections --------------------------------------------------------------------------------------
function upload(name, files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const bar = $("#upload-progress");
  const status = $("#upload-status");
  bar.hidden = false; bar.value = 0;
  status.textContent = `uploading ${files.length} file(s) to ${name}...`;
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/collections/${encodeURIComponent(name)}/items`);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
    xhr.onload = () => {
      bar.value = 1;
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) {
        status.textContent = `added ${body.ids.length} item(s) to ${name}: ${body.ids.join(", ")}`;
        resolve(body);
      } else {
        status.textContent = "";
        reject(new Error(xhr.status + ": " + (body.detail || xhr.statusText)));
      }
    };
    xhr.onerror = () => reject(new Error("upload failed: the server did not answer"));
    xhr.send(form);
  });
}

async function loadCollections() {
  await loadCollectionPicker();
  const rows = collections.map((c) => {
    const zone = el("div", { class: "drop", "data-collection": c.name, text: "drop files" }, [
      el("input", { type: "file", multiple: "", "aria-label": "upload to " + c.name,
                    onchange: guard(async (e) => { await upload(c.name, e.target.files); await loadCollections(); }) })]);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", guard(async (e) => { zone.classList.remove("over"); await upload(c.name, e.dataTransfer.files); await loadCollections(); }));
    return el("tr", { "data-collection": c.name }, [
      el("td", { text: c.name }), el("td", { class: "kind", text: kindLabel(c) }),
      el("td", { class: "count", text: String(c.items) + (c.moments ? ` (${c.moments.indexed} moments)` : "") }),
      el("td", { text: c.adapter }), el("td", {}, [zone]),
      el("td", {}, [el("button", { text: "delete", onclick: guard(async () => {
        if (!confirm(`delete collection ${c.name}?`)) return;
        await api(`/collections/${encodeURIComponent(c.name)}`, { method: "DELETE" });
        await loadCollections();
      }) })]),
    ]);
  });
  $("#collection-table tbody").replaceChildren(...rows);
}

// Moments: video collections only; an empty window or stride takes the server's default.
$("#create-kind").addEventListener("change", () => { $("#create-moments-set").disabled = $("#create-kind").value !== "video"; });

$("#create-form").addEventListener("submit", guard(async () => {
  const body = { name: $("#create-name").value.trim(), kind: $("#create-kind").value };
  if (body.kind === "video" && $("#create-moments").checked) {
    body.moments = {};
    for (const [field, input] of [["window_s", "#create-window"], ["stride_s", "#create-stride"]]) {
      if ($(input).value.trim()) body.moments[field] = Number($(input).value);
    }
  }
  await api("/collections", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  $("#create-name").value = "";
  await loadCollections();
}));

async function refreshAll() { await guard(loadCollectionPicker)(); }
refreshAll();
