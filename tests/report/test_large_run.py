"""A report of 1,000 queries x top 100 opens fast: first paint in headless chromium under 2 s.

Marked slow (it writes a synthetic run of 100,000 rows and token rows, about a minute); run with
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m slow tests/report/test_large_run.py -s`` to see the figures.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.report import ReportSettings, render_report
from attribution.scoring.tables import SCORE_SCHEMA, TOKEN_SCHEMA
from tests.report.helpers import WORDS, browser, require_chromium
from tests.tiny import save_tiny_lm

QUERIES, TOP_K, DOCUMENTS, MODULES, SHARDS = 1000, 100, 20000, 32, 8


def synthetic_run(root, seed: int = 0):
    """A score run as run_score writes it: record, score table, token table, queries, corpus shards."""
    rng = np.random.default_rng(seed)
    model_dir = save_tiny_lm(root / "model", WORDS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for _ in range(DOCUMENTS)]
    (root / "corpus").mkdir()
    shard_of = []
    for shard in range(SHARDS):
        ids = list(range(shard, DOCUMENTS, SHARDS))
        path = root / "corpus" / f"shard-{shard}.parquet"
        pq.write_table(pa.table({"id": [f"doc-{i:05d}" for i in ids], "text": [texts[i] for i in ids]}), path)
        shard_of += [(i, str(path)) for i in ids]
    shard_path = dict(shard_of)
    queries = [{"id": f"q-{q:04d}", "prompt": f"the cat number {q} sat on", "completion": " a mat",
                "source_ids": [f"doc-{int(rng.integers(DOCUMENTS)):05d}"]} for q in range(QUERIES)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    run_id = "20260101T000000Z-score-large0"
    score_rows, token_rows = [], []
    modules = [f"gpt_neox.layers.{i // 4}.{name}" for i, name in zip(range(MODULES), ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"] * MODULES)]
    for query in queries:
        documents = rng.choice(DOCUMENTS, size=TOP_K, replace=False)
        scores = np.sort(rng.lognormal(3, 1, size=TOP_K))[::-1]
        for rank, (doc, score) in enumerate(zip(documents, scores), 1):
            layers = rng.dirichlet(np.ones(MODULES)) * score
            score_rows.append({"run_id": run_id, "query_id": query["id"], "direction": "positive", "rank": rank,
                               "doc_id": f"doc-{doc:05d}", "score": float(layers.sum()), "layer_scores": layers.astype(np.float32),
                               "shard": shard_path[doc], "method": "ekfac"})
            tokens = tokenizer.convert_ids_to_tokens(tokenizer(texts[doc], truncation=True, max_length=128)["input_ids"])
            token_rows.append({"run_id": run_id, "query_id": query["id"], "doc_id": f"doc-{doc:05d}", "tokens": tokens,
                               "token_scores": (rng.dirichlet(np.ones(len(tokens))) * layers.sum()).astype(np.float32)})
    output = root / "out"
    for name, rows, schema in (("scores", score_rows, SCORE_SCHEMA), ("token_scores", token_rows, TOKEN_SCHEMA)):
        (output / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), output / name / f"{run_id}.parquet")
    record = {"job": "score", "run_id": run_id, "started": "2026-01-01T00:00:00+00:00",
              "counts": {"queries": QUERIES, "queries_scored": QUERIES, "documents_scored": DOCUMENTS},
              "outputs": {"scores": str(output / "scores" / f"{run_id}.parquet"),
                          "token_scores": str(output / "token_scores" / f"{run_id}.parquet")},
              "config": {"modules": modules, "resolved_settings": {
                  "model": {"path": str(model_dir)}, "data": {"path": str(root / "corpus"), "id_field": "id", "text_field": "text"},
                  "queries": {"path": str(root / "queries.jsonl")}, "score": {"top_k": TOP_K, "bottom_k": 0, "rank": 32},
                  "factors": {"strategy": "ekfac", "path": "store"}}}}
    (output / "runs").mkdir()
    (output / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    return output / "runs" / f"{run_id}.json"


@pytest.mark.slow
def test_a_thousand_queries_at_top_100_paint_within_two_seconds(tmp_path):
    require_chromium()
    record_path = synthetic_run(tmp_path)
    started = time.perf_counter()
    report = render_report(record_path, ReportSettings())
    rendered = time.perf_counter() - started
    with browser() as instance:
        tab = instance.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(report.path.as_uri(), wait_until="commit")
        tab.wait_for_function("performance.getEntriesByType('paint').some(e => e.name === 'first-contentful-paint')")
        paint = tab.evaluate("performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime")
        tab.wait_for_selector("body[data-view=index]")
        tab.wait_for_load_state("load")
        ready, loaded = tab.evaluate("""[performance.getEntriesByName('report-ready')[0].startTime,
                                        performance.getEntriesByType('navigation')[0].loadEventStart]""")
        tab.goto(report.path.as_uri() + "#/q/999")
        tab.wait_for_selector("body[data-view=q999]")
        tokens = tab.locator(".tok").count()
    size = report.path.stat().st_size / 2**20
    print(f"\n1,000 queries x top 100: report built in {rendered:.1f} s, {size:.0f} MiB; first contentful paint "
          f"{paint / 1000:.2f} s, index searchable {ready / 1000:.2f} s, page loaded {loaded / 1000:.2f} s; "
          f"query 999 shows {tokens} tokens")
    assert errors == []
    assert tokens > 0
    assert paint < 2000
