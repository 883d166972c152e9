"""A small finished score run (tiny model, fitted store, sources, bottom rows, token scores) and a browser."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

WORDS = "the cat sat on a mat while dogs ran in parks near rivers and birds sang over hills".split()
CHROMIUM = shutil.which("chromium")


def corpus_rows(count: int = 16) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"id": f"doc-{i:02d}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(4, 14))))} for i in range(count)]


QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat", "source_ids": ["doc-03", "doc-07"]},
    {"id": "q-dog", "prompt": "dogs ran in", "completion": " parks", "source_ids": ["doc-11"]},
    {"id": "q-bird", "prompt": "birds sang over", "completion": " hills and rivers"},
]


def make_score_run(root: Path, **score: object) -> tuple[Path, dict]:
    """Fit and score a tiny model in this process; returns the run record and what went in."""
    from attribution.fitting import run_fit
    from attribution.scoring.run import run_score
    from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings
    from tests.tiny import save_tiny_lm

    rows = corpus_rows()
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    (root / "corpus").mkdir(parents=True)
    for index, part in enumerate((rows[:8], rows[8:])):
        pq.write_table(pa.Table.from_pylist(part), root / "corpus" / f"shard-{index}.parquet")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=str(root / "corpus"), max_length=16, batch_size=4)
    output = root / "out"
    fit = run_fit(model, data, FactorSettings(), output, {}, progress=False)
    settings = ScoreSettings(**{"rank": 4, "top_k": 6, "bottom_k": 3, "query_batch_size": 2, "progress": False, **score})
    summary = run_score(model, data, FactorSettings(path=str(fit.factors_path)), QuerySettings(path=str(queries)),
                        settings, output, {})
    return summary.run_record, {"rows": rows, "output": output}


def require_chromium() -> str:
    """Debian's chromium; CI installs it (.ci/run), so there a missing browser fails instead of skipping."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


@contextmanager
def browser():
    """Headless chromium driven over the DevTools protocol by playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield instance
        finally:
            instance.close()


DEMO_QUERY = "q-0002"  # 'Brethsar Drailthu works as a' -> ' geologist'


def make_demo_run(root: Path, documents: int = 40) -> Path:
    """The demo model's query DEMO_QUERY scored against its true sources and the first
    ``documents`` other demo documents, as the gradient dot product: real text and a trained
    model's token scores, with no factor store to fit. Returns the run record."""
    from attribution.data.corpus import iter_documents, list_shards
    from attribution.data.queries import read_queries
    from attribution.demo.train import ensure_demo
    from attribution.scoring.run import run_score
    from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings

    demo = ensure_demo()
    (query,) = [q for q in read_queries(demo.queries_path, on_skip=lambda skip: None) if q.id == DEMO_QUERY]
    corpus = list(iter_documents(list_shards(demo.corpus_dir), on_skip=lambda skip: None))
    kept = [d for d in corpus if d.id in query.source_ids] + [d for d in corpus if d.id not in query.source_ids][:documents]
    (root / "corpus").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": d.id, "text": d.text} for d in kept]), root / "corpus" / "shard-0.parquet")
    queries = root / "queries.jsonl"
    queries.write_text(json.dumps({"id": query.id, "prompt": query.prompt, "completion": query.completion,
                                   "source_ids": list(query.source_ids)}) + "\n")
    summary = run_score(ModelSettings(path=str(demo.model_dir), device="cpu"), DataSettings(path=str(root / "corpus")),
                        FactorSettings(strategy="identity"), QuerySettings(path=str(queries)),
                        ScoreSettings(top_k=12, bottom_k=3, progress=False), root / "out", {})
    return summary.run_record
