// The report's views: the index (search, pages) and one query at a time, drawn when opened.
// Data sits in <script type="application/json"> blocks: a query's block is parsed only when it is shown.
"use strict";

const INDEX = JSON.parse(document.getElementById("index-data").textContent);
const LAYOUTS = JSON.parse(document.getElementById("layouts").textContent);
const PLOT_CONFIG = { displaylogo: false, responsive: true };
const state = { matches: INDEX, page: 0 };

// plotly.js (inlined in the page as text) is evaluated on first use.
function plotly() {
  if (!window.Plotly) {
    const script = document.createElement("script");
    script.textContent = document.getElementById("plotly-js").textContent;
    document.head.append(script);
  }
  return window.Plotly;
}

// A chart in a div as tall as its layout asks (a responsive plot otherwise fills its div's height).
function draw(target, traces, layout) {
  const node = typeof target === "string" ? document.getElementById(target) : target;
  node.style.height = layout.height + "px";
  plotly().newPlot(node, traces, layout, PLOT_CONFIG);
}

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function formatScore(value) {
  if (value === null || value === undefined) return "";
  const text = value.toExponential(3);
  return value >= 0 ? "+" + text : text;
}

function sourceCell(rank) {
  if (rank === -1) return "—";
  return rank === null ? "not kept" : "★ " + rank;
}

// Index: filter, page, rows.
function renderIndex() {
  const start = state.page * PAGE_SIZE;
  const rows = state.matches.slice(start, start + PAGE_SIZE).map(([number, id, prompt, completion, topDoc, topScore, sourceRank]) =>
    el("tr", {},
      el("td", {}, el("a", { href: "#/q/" + number }, id)),
      el("td", {}, el("span", { class: "prompt" }, prompt), el("span", { class: "completion" }, completion)),
      el("td", {}, topDoc),
      el("td", { class: "num" }, formatScore(topScore)),
      el("td", { class: "num" }, sourceCell(sourceRank))));
  document.getElementById("index-rows").replaceChildren(...rows);
  const last = Math.min(start + PAGE_SIZE, state.matches.length);
  document.getElementById("page-info").textContent = state.matches.length
    ? `${start + 1}–${last} of ${state.matches.length} queries` + (state.matches.length < INDEX.length ? ` (of ${INDEX.length})` : "")
    : `no query matches (of ${INDEX.length})`;
  document.getElementById("prev").disabled = state.page === 0;
  document.getElementById("next").disabled = last >= state.matches.length;
}

function search(text) {
  const needle = text.trim().toLowerCase();
  state.matches = needle
    ? INDEX.filter((entry) => [entry[1], entry[2], entry[3], entry[4]].some((field) => String(field).toLowerCase().includes(needle)))
    : INDEX;
  state.page = 0;
  renderIndex();
}

function drawRunLayers() {
  const target = document.getElementById("run-layers");
  const data = document.getElementById("run-layers-data");
  if (target && data && !target.dataset.drawn) {
    target.dataset.drawn = "1";
    draw(target, [JSON.parse(data.textContent)], LAYOUTS.run_share);
  }
}

// One query.
function tokenColour(score, scale) {
  if (!scale || !score) return "transparent";
  const alpha = Math.min(1, Math.abs(score) / scale) * 0.85;
  return `rgba(var(${score > 0 ? "--pos" : "--neg"}), ${alpha.toFixed(3)})`;
}

// A token's hover text: its score, or why it has none (nothing predicts a document's first token).
function tokenTitle(text, score) {
  return `${JSON.stringify(text)}: ${score === null ? "first token, not predicted" : formatScore(score)}`;
}

function tokenSpans(doc) {
  const scale = Math.max(...doc.s.map(Math.abs));
  const box = el("div", { class: "tokens", "data-tokens": doc.s.length });
  const special = new Set(doc.special);
  doc.t.forEach((text, i) => {
    // The gap before a token (spaces, newlines) stays uncoloured.
    const [, gap, word] = text.match(/^(\s*)([\s\S]*)$/);
    const raw = doc.raw[i];
    const span = el("span", {
      class: "tok" + (special.has(i) ? " special" : ""),
      title: tokenTitle(raw !== undefined ? raw : word, doc.s[i]),
      "data-score": doc.s[i],
      style: "background:" + tokenColour(doc.s[i], scale),
    }, word);
    box.append(gap, span);
  });
  return box;
}

function documentCard(doc, direction) {
  const head = el("div", { class: "doc-head" },
    el("span", {}, `${direction === "bottom" ? "bottom " : ""}rank ${doc.rank}`),
    el("span", { class: "doc-id" }, doc.doc),
    el("span", { class: "score" }, "score " + formatScore(doc.score)),
    el("span", {}, doc.shard),
    doc.source ? el("span", { class: "badge" }, "★ true source") : null);
  let body;
  if (doc.t) body = tokenSpans(doc);
  else if (doc.text !== null && doc.text !== undefined) body = el("div", { class: "tokens plain" }, doc.text);
  else body = el("div", { class: "note" }, "text not available (its shard cannot be read)");
  return el("article", { class: "doc" + (doc.source ? " source" : ""), "data-doc": doc.doc }, head, body);
}

function sourceLine(q) {
  if (!q.sources.length) return el("p", { class: "sources note" }, "No known true sources for this query (it has no source_ids).");
  const found = q.first_source === null
    ? `none of them is among the ${q.kept.top} kept top rows`
    : `the first is ranked ${q.first_source}`;
  const missing = q.missing_sources.length ? `; not kept: ${q.missing_sources.join(", ")}` : "";
  return el("p", { class: "sources" }, `True sources (${q.sources.length}): ${q.sources.join(", ")}: ${found}${missing}.`);
}

function renderQuery(number) {
  const block = document.getElementById("q" + number);
  const view = document.getElementById("query-view");
  if (!block && document.readyState === "loading") {
    // The query blocks follow this script: a link opened at once waits for them.
    view.replaceChildren(el("p", { class: "note" }, "Loading…"));
    document.addEventListener("DOMContentLoaded", route, { once: true });
    return false;
  }
  if (!block) {
    view.replaceChildren(el("p", {}, "No such query. "), el("a", { href: "#/" }, "All queries"));
    return true;
  }
  const q = JSON.parse(block.textContent);
  const nav = el("div", { class: "nav" }, el("a", { href: "#/" }, "← all queries"),
    number > 0 ? el("a", { href: "#/q/" + (number - 1) }, "‹ previous query") : null,
    document.getElementById("q" + (number + 1)) ? el("a", { href: "#/q/" + (number + 1) }, "next query ›") : null);
  const scored = q.scored ? ` of the ${q.scored} documents scored` : "";
  const charts = el("div", { class: "charts" },
    el("div", { class: "chart", id: "distribution" }),
    q.share ? el("div", { class: "chart", id: "share" }) : null);
  const parts = [nav, el("h2", {}, q.id),
    el("p", { class: "qa" }, el("span", { class: "prompt" }, q.prompt), el("span", { class: "completion" }, q.completion)),
    sourceLine(q), charts,
    el("p", { class: "note" }, `The score table keeps the top ${q.kept.top}` + (q.kept.bottom ? ` and bottom ${q.kept.bottom}` : "") +
      ` rows${scored}; the documents between them are not stored, so the chart shows the kept rows only, at their positions.`)];
  if (q.layers) {
    parts.push(el("div", { class: "chart", id: "layers" }));
  } else {
    parts.push(el("p", { class: "note", id: "no-layers" }, "This run stored no per-module scores (prefilter ranking, or score.layer_scores=false)."));
  }
  parts.push(el("h3", {}, `Top ${q.top.length} documents`),
    el("div", { class: "legend" }, "lowers the completion's log-probability", el("span", { class: "bar" }), "raises it",
      el("span", {}, "Each token is coloured by the score of its own prediction from the text before it, " +
        "scaled to the document's largest |token score|; hover a token for its score")));
  q.top.forEach((doc) => parts.push(documentCard(doc, "top")));
  if (q.bottom.length) {
    parts.push(el("h3", {}, `Bottom ${q.bottom.length} documents (most negative scores; token scores are kept for top rows only)`));
    q.bottom.forEach((doc) => parts.push(documentCard(doc, "bottom")));
  }
  view.replaceChildren(...parts);
  draw("distribution", q.distribution, LAYOUTS.distribution);
  if (q.share) draw("share", [q.share], LAYOUTS.share);
  if (q.layers) draw("layers", [q.layers], LAYOUTS.layers);
  return true;
}

function route() {
  const match = location.hash.match(/^#\/q\/(\d+)$/);
  const index = document.getElementById("index-view");
  const view = document.getElementById("query-view");
  if (match) {
    index.hidden = true;
    view.hidden = false;
    if (renderQuery(Number(match[1]))) {
      window.scrollTo(0, 0);
      document.body.dataset.view = "q" + match[1];
    }
  } else {
    view.hidden = true;
    view.replaceChildren();
    index.hidden = false;
    document.body.dataset.view = "index";
    // After the index is painted: the chart below it needs plotly.js.
    setTimeout(drawRunLayers, 0);
  }
}

document.getElementById("search").addEventListener("input", (event) => search(event.target.value));
document.getElementById("prev").addEventListener("click", () => { state.page -= 1; renderIndex(); });
document.getElementById("next").addEventListener("click", () => { state.page += 1; renderIndex(); });
window.addEventListener("hashchange", route);
renderIndex();
route();
performance.mark("report-ready");
