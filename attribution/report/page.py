"""The HTML report of a score run: one self-contained file (plotly.js inlined, no network at view time).

The page holds an index of every query (searchable, paged) and one view per query, whose data
is a JSON block parsed and drawn only when the query is opened, so a run of thousands of
queries opens as fast as a small one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

from attribution.report import figures
from attribution.report.run import Row, ScoreRun, load_score_run
from attribution.report.settings import ReportSettings
from attribution.report.tokens import TokenText, document_texts, load_tokenizer, predicted_token_scores, token_texts
from attribution.report.top_documents import recall_at, reciprocal_rank

TEMPLATES = Path(__file__).parent / "templates"
RECALL_K = 10

METHOD_LABELS = {
    "ekfac": "EK-FAC influence",
    "kfac": "K-FAC influence",
    "diagonal": "diagonal influence",
    "identity": "gradient dot product (no preconditioning)",
    "multi_stage": "multi-stage EK-FAC influence (fine-tuned query gradients, both stages' factors)",
    "multi_stage_identity": "multi-stage gradient dot product",
    "tfidf": "TF-IDF ranking (prefilter only, not influence)",
    "bm25": "BM25 ranking (prefilter only, not influence)",
    "dense": "dense-embedding ranking (prefilter only, not influence)",
}


@dataclass(frozen=True)
class Report:
    path: Path
    run_id: str
    queries: int
    seconds: float

    def line(self) -> str:
        return f"report of score run {self.run_id} ({self.queries} queries) in {self.seconds:.1f} s -> {self.path}"


def render_report(record_path: str | Path, settings: ReportSettings = ReportSettings()) -> Report:
    """Write the report of the score run whose record is ``record_path``."""
    started = time.perf_counter()
    run = load_score_run(record_path, settings.documents, settings.queries_path)
    path = Path(settings.path) if settings.path is not None else run.output_dir / "reports" / f"{run.run_id}.html"
    html = page_html(run, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(html, encoding="utf-8")
    os.replace(staging, path)
    scored = sum(1 for q in run.queries if q.id in run.positive or q.id in run.negative)
    return Report(path, run.run_id, scored, time.perf_counter() - started)


def page_html(run: ScoreRun, settings: ReportSettings) -> str:
    from plotly.offline import get_plotlyjs

    queries = [q for q in run.queries if q.id in run.positive or q.id in run.negative]
    shown = settings.documents
    texts, missing_shards = _texts(run, queries, shown)
    data_settings = run.settings.get("data", {})
    model_settings = run.settings.get("model", {})
    tokenizer = load_tokenizer(model_settings.get("path"), bool(model_settings.get("trust_remote_code", False))) if run.tokens else None
    candidates = run.record.get("config", {}).get("prefilter_candidates") or {}
    payloads, index, largest = [], [], 1
    for number, query in enumerate(queries):
        payload = _query_payload(run, query, shown, texts, tokenizer, _scored(run, query.id, candidates))
        payloads.append(_json(payload))
        index.append(_index_entry(number, query, payload))
        largest = max(largest, figures.last_position(payload["distribution"]))
    metrics = _metrics(run, queries)
    layouts = figures.layouts(len(run.modules), largest)
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    return environment.get_template("report.html.j2").render(
        run=run, summary=_run_summary(run, data_settings), metrics=metrics, index=index,
        first_page=index[:settings.page_size], page_size=settings.page_size, shown=shown, payloads=payloads,
        run_layers=_run_layers(run, shown), layouts=_json(layouts), missing_shards=missing_shards,
        index_json=_json(index), style=(TEMPLATES / "report.css").read_text(), script=(TEMPLATES / "report.js").read_text(),
        plotly_js=get_plotlyjs(),
    )


def _texts(run: ScoreRun, queries: list[Any], shown: int) -> tuple[dict[str, str], list[str]]:
    """The texts of the documents the report lists, from the shards the score table names."""
    wanted: dict[str, set[str]] = {}
    for query in queries:
        for row in run.positive.get(query.id, [])[:shown] + run.negative.get(query.id, [])[:shown]:
            wanted.setdefault(row.shard, set()).add(row.doc_id)
    data = run.settings.get("data", {})
    return document_texts(wanted, data.get("id_field", "id"), data.get("text_field", "text"))


def _scored(run: ScoreRun, query_id: str, candidates: dict[str, Any]) -> int | None:
    """How many documents the query was ranked among: its prefilter candidates, or the run's count."""
    per_query = candidates.get("candidates_per_query", {})
    if query_id in per_query:
        return int(per_query[query_id])
    return run.counts.get("documents_scored")


def _query_payload(run: ScoreRun, query: Any, shown: int, texts: dict[str, str], tokenizer: Any, scored: int | None) -> dict[str, Any]:
    top = run.positive.get(query.id, [])
    bottom = run.negative.get(query.id, [])
    sources = set(query.source_ids)
    listed = top[:shown]
    token_rows = [run.tokens.get((query.id, row.doc_id)) for row in listed]
    laid = token_texts(tokenizer, [texts.get(row.doc_id) for row in listed], [t[0] if t else [] for t in token_rows])
    payload: dict[str, Any] = {
        "id": query.id, "prompt": query.prompt, "completion": query.completion, "sources": sorted(sources),
        "top": [_document(row, texts, sources, tokens, text) for row, tokens, text in zip(listed, token_rows, laid)],
        "bottom": [_document(row, texts, sources, None, None) for row in bottom[:shown]],
        "kept": {"top": len(top), "bottom": len(bottom)}, "scored": scored,
        "distribution": figures.distribution([r.score for r in top], [r.score for r in bottom], shown, scored),
    }
    if sources:
        payload["first_source"] = next((row.rank for row in top if row.doc_id in sources), None)
        payload["missing_sources"] = sorted(sources - {row.doc_id for row in top})
    layer_scores = np.stack([row.layer_scores for row in listed]) if listed else np.zeros((0, 0))
    if listed and run.modules and layer_scores.shape[1] == len(run.modules):
        labels = [f"{row.rank}. {row.doc_id}" for row in listed]
        payload["layers"] = figures.layer_heatmap(run.modules, labels, layer_scores)
        payload["share"] = figures.share_bars(*figures.layer_shares(run.modules, layer_scores))
    return payload


def _document(row: Row, texts: dict[str, str], sources: set[str], tokens: tuple[list[str], np.ndarray] | None,
              laid: TokenText | None) -> dict[str, Any]:
    document: dict[str, Any] = {"rank": row.rank, "doc": row.doc_id, "score": row.score, "shard": Path(row.shard).name,
                                "source": row.doc_id in sources}
    if tokens is not None and laid is not None and tokens[0]:
        document["t"] = laid.display
        document["s"] = _rounded(predicted_token_scores(tokens[1].tolist()))
        document["raw"] = laid.raw
        document["special"] = laid.special
        document["aligned"] = laid.aligned
    else:
        document["text"] = texts.get(row.doc_id)
    return document


def _rounded(scores: list[float | None]) -> list[float | None]:
    """Four significant digits: all that a colour or a hover shows."""
    return [None if score is None else float(f"{score:.4g}") for score in scores]


def _index_entry(number: int, query: Any, payload: dict[str, Any]) -> list[Any]:
    first = payload["top"][0] if payload["top"] else None
    source_rank = payload.get("first_source", -1) if query.source_ids else -1
    return [number, query.id, query.prompt, query.completion, first["doc"] if first else "",
            first["score"] if first else None, source_rank]


def _metrics(run: ScoreRun, queries: list[Any]) -> dict[str, Any]:
    """MRR and Recall@10 within the kept top rows, over the queries that carry source_ids."""
    with_sources = [q for q in queries if q.source_ids]
    if not with_sources:
        return {}
    ranks = [reciprocal_rank(run.positive.get(q.id, []), q.source_ids) for q in with_sources]
    recalls = [recall_at(run.positive.get(q.id, []), q.source_ids, RECALL_K) for q in with_sources]
    return {"queries": len(with_sources), "mrr": float(np.mean(ranks)), "recall": float(np.mean(recalls)),
            "first": sum(r == 1.0 for r in ranks), "k": RECALL_K,
            "kept": min((len(run.positive.get(q.id, [])) for q in with_sources), default=0)}


def _run_layers(run: ScoreRun, shown: int) -> dict[str, Any] | None:
    """The per-layer share of the total over every query's listed top documents."""
    rows = [row for rows in run.positive.values() for row in rows[:shown]]
    if not rows or not run.modules or any(row.layer_scores.shape[0] != len(run.modules) for row in rows):
        return None
    names, shares = figures.layer_shares(run.modules, np.stack([row.layer_scores for row in rows]))
    return {"trace": _json(figures.share_bars(names, shares)), "documents": len(rows)}


def _run_summary(run: ScoreRun, data: dict[str, Any]) -> list[tuple[str, str]]:
    settings = run.settings
    score = settings.get("score", {})
    label = METHOD_LABELS.get(run.method, run.method)
    refine = settings.get("refine", {}).get("method", "none")
    if refine not in (None, "none"):
        label += f", refined by {refine}"
    if score.get("normalize"):
        label += ", each divided by the document's gradient norm"
    prefilter = settings.get("prefilter", {})
    items = [("method", f"{label} [{run.method}]"), ("run", run.run_id), ("started", run.record.get("started", ""))]
    model = settings.get("model", {}).get("path")
    if model:
        items.append(("model", str(model)))
    finetune = settings.get("finetune", {})
    if finetune.get("model_path"):
        items.append(("fine-tuned model (query side)", str(finetune["model_path"])))
    factors = settings.get("factors", {})
    if factors.get("path") and factors.get("strategy") != "identity":
        items.append(("factor store", str(factors["path"])))
    if finetune.get("factors_path"):
        items.append(("fine-tuned factor store", str(finetune["factors_path"])))
    if data.get("path"):
        items.append(("corpus", str(data["path"])))
    counts = run.counts
    items.append(("documents scored", str(counts.get("documents_scored", "?"))))
    items.append(("queries scored", f"{counts.get('queries_scored', '?')} of {counts.get('queries', '?')}"))
    kept = f"top {score.get('top_k', '?')}" + (f", bottom {score['bottom_k']}" if score.get("bottom_k") else "")
    items.append(("rows kept per query", kept))
    if score.get("rank", "absent") != "absent":
        items.append(("query factor rank", "full" if score.get("rank") is None else str(score["rank"])))
    if prefilter.get("kind") not in (None, "none") and run.method not in ("tfidf", "bm25", "dense"):
        items.append(("prefilter", f"{prefilter['kind']}, top {prefilter.get('top_m')} candidates per query"))
    if run.record.get("git_revision"):
        items.append(("git revision", str(run.record["git_revision"])[:12]))
    return items


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
