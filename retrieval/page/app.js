// The search page of `tipslab serve`: one form, a grid of hits, boxes drawn over the images.
"use strict";
const $ = (id) => document.getElementById(id);
let lastRequest = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadIndexes() {
  const answer = await (await fetch("/api/indexes")).json();
  for (const info of answer.indexes) {
    const option = document.createElement("option");
    option.value = info.name;
    option.textContent = `${info.name} (${info.images} images)`;
    $("index").appendChild(option);
  }
}

function filters() {
  const prefix = $("key-prefix").value.trim();
  return prefix ? { key_prefix: prefix } : null;
}

async function search(body) {
  lastRequest = body;
  setStatus("searching…");
  let answer;
  try {
    const response = await fetch("/api/search", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    answer = await response.json();
    if (!response.ok) { setStatus(answer.error || `error ${response.status}`, true); return; }
  } catch (err) {
    setStatus(`the service did not answer (${err})`, true);
    return;
  }
  render(answer);
}

function render(answer) {
  const grid = $("hits");
  grid.replaceChildren();
  for (const hit of answer.results) grid.appendChild(card(hit));
  const notes = answer.notes.length ? " — " + answer.notes.join("; ") : "";
  setStatus(`${answer.results.length} region(s) for “${answer.query}” in ${answer.index} ` +
            `[${answer.took_ms} ms]${notes}`, false);
  grid.dataset.query = answer.query;
}

function card(hit) {
  const [width, height] = hit.image_size;
  const [x0, y0, x1, y1] = hit.box;
  const el = document.createElement("div");
  el.className = "hit";
  el.dataset.rank = hit.rank;
  const frame = document.createElement("div");
  frame.className = "frame";
  const image = new Image();
  image.src = hit.image_url;
  image.alt = hit.image_key;
  const heat = new Image();
  heat.className = "heat";
  heat.loading = "lazy";
  heat.src = hit.heatmap_url;
  const box = document.createElement("div");
  box.className = "box";
  Object.assign(box.style, {
    left: `${(100 * x0) / width}%`, top: `${(100 * y0) / height}%`,
    width: `${(100 * (x1 - x0)) / width}%`, height: `${(100 * (y1 - y0)) / height}%`,
  });
  frame.append(image, heat, box);
  const caption = document.createElement("div");
  caption.className = "caption";
  const conf = hit.confidence === null ? "" : `<span class="conf">${hit.confidence.toFixed(2)}</span> · `;
  caption.innerHTML = `#${hit.rank} · ${conf}score ${hit.score.toFixed(3)}<br><span class="key"></span>`;
  caption.querySelector(".key").textContent = `${hit.image_key} [${hit.box.join(",")}]`;
  el.append(frame, caption);
  el.title = "click: more like this region";
  el.addEventListener("click", () => search({
    index: $("index").value, region: { image_id: hit.image_id, box: hit.box },
    k: Number($("k").value) || 12, filters: filters(),
  }));
  return el;
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const threshold = $("threshold").value === "" ? null : Number($("threshold").value);
  search({ index: $("index").value, query: $("q").value, k: Number($("k").value) || 12, threshold,
           filters: filters() });
});
$("heat").addEventListener("change", () => document.body.classList.toggle("show-heat", $("heat").checked));
loadIndexes().catch((err) => setStatus(`cannot list the indexes (${err})`, true));
