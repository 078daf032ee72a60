// The search page: calls the JSON API (/api/search, /api/similar, /api/upload) and renders
// the results; text only through textContent (names come from the user's files).
"use strict";

const $ = (id) => document.getElementById(id);
// What the current list shows, so paging repeats it with another offset.
let current = null;  // {kind: "search"|"similar"|"upload", q, clip, file, offset}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function pageSize() { return Number($("k").value); }

function formatSeconds(s) {
  if (s === null || s === undefined) return "duration unknown";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, "0")} min`;
}

function render(body, title) {
  const list = $("results");
  list.replaceChildren();
  const template = $("result-template");
  for (const hit of body.results) {
    const item = template.content.firstElementChild.cloneNode(true);
    item.dataset.clip = hit.clip;
    item.querySelector(".rank").textContent = `#${hit.rank}`;
    item.querySelector(".name").textContent = hit.name;
    item.querySelector(".score").textContent = `score ${hit.score.toFixed(4)}`;
    item.querySelector(".duration").textContent = formatSeconds(hit.duration);
    const thumb = item.querySelector(".thumb");
    thumb.src = hit.thumbnail;
    thumb.onerror = () => { thumb.style.visibility = "hidden"; };
    item.querySelector("audio").src = hit.audio;
    item.querySelector(".similar").onclick = () => run({kind: "similar", clip: hit.clip, name: hit.name, offset: 0});
    list.appendChild(item);
  }
  const batch = body.batch > 1 ? `, answered with ${body.batch - 1} other queries in one model call` : "";
  $("status").textContent = body.results.length
    ? `${title}: results ${body.offset + 1}-${body.offset + body.results.length} of ${body.corpus} clips in ${body.took_ms.toFixed(0)} ms${batch}`
    : `${title}: no results`;
  $("pager").hidden = false;
  $("prev").disabled = body.offset === 0;
  $("next").disabled = body.results.length < body.k;
  $("page").textContent = `page ${Math.floor(body.offset / body.k) + 1}`;
}

async function run(what) {
  current = what;
  showError("");
  $("status").textContent = "searching...";
  const k = pageSize();
  try {
    let body, title;
    if (what.kind === "search") {
      const params = new URLSearchParams({q: what.q, k, offset: what.offset, shortlist: $("shortlist").value});
      body = await callApi(`/api/search?${params}`);
      title = `"${what.q}"`;
    } else if (what.kind === "similar") {
      const params = new URLSearchParams({clip: what.clip, k, offset: what.offset});
      body = await callApi(`/api/similar?${params}`);
      title = `more like ${what.name}`;
    } else {
      const form = new FormData();
      form.append("file", what.file);
      body = await callApi(`/api/upload?${new URLSearchParams({k, offset: what.offset})}`, {method: "POST", body: form});
      title = `like ${what.file.name}`;
    }
    render(body, title);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function init() {
  try {
    const info = await callApi("/api/info");
    $("corpus").textContent = `${info.clips} clips (index "${info.index}")`;
    $("query").maxLength = info.limits.max_query_chars;
    for (const size of info.limits.shortlists) {
      const option = new Option(`${size} clips`, size, false, size === info.limits.default_shortlist);
      $("shortlist").add(option);
    }
    $("upload-limits").textContent = `at most ${(info.limits.max_upload_bytes / 1048576).toFixed(0)} MiB and ${info.limits.max_upload_seconds} s`;
  } catch (e) {
    showError(`the index could not be described: ${e.message}`);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run({kind: "search", q: $("query").value, offset: 0});
});
$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("upload").files[0];
  if (!file) { showError("choose an audio file to search by"); return; }
  run({kind: "upload", file, offset: 0});
});
$("prev").onclick = () => current && run({...current, offset: Math.max(0, current.offset - pageSize())});
$("next").onclick = () => current && run({...current, offset: current.offset + pageSize()});
init();
