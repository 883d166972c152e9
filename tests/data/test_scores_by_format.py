"""The same documents score the same whatever form the corpus comes in, and bad rows reach the user as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attribution.fitting import run_fit
from attribution.scoring.run import run_score
from attribution.settings import (
    DataSettings,
    FactorSettings,
    ModelSettings,
    QuerySettings,
    ScoreSettings,
)
from tests.data.writers import FORMATS, write_json
from tests.scoring.test_run import WORDS, corpus_rows
from tests.tiny import save_tiny_lm

ROOT = Path(__file__).resolve().parents[2]
SCORED_FORMATS = ["jsonl.gz", "jsonl.zst", "json_array.gz", "parquet", "arrow_file", "save_to_disk"]
QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat"},
    {"id": "q-bird", "prompt": "birds sang over", "completion": " hills and rivers"},
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    rows = corpus_rows(10)
    model = ModelSettings(path=str(save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)), device="cpu")
    reference = FORMATS["jsonl"](root / "jsonl", rows)
    data = DataSettings(path=str(reference), max_length=16, batch_size=4)
    fit = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    queries = QuerySettings(path=str(write_json(root / "queries.jsonl", QUERIES)))
    return root, rows, model, data, FactorSettings(path=str(fit.factors_path)), queries


def scores(fitted, corpus: Path, output: str) -> list[tuple]:
    root, _, model, _, factors, queries = fitted
    settings = ScoreSettings(rank=4, top_k=4, bottom_k=1, query_batch_size=2, token_scores=False, progress=False)
    summary = run_score(model, DataSettings(path=str(corpus), max_length=16, batch_size=4), factors, queries,
                        settings, root / output, {})
    table = pq.read_table(summary.scores_path)
    return sorted(zip(*(table.column(c).to_pylist() for c in ("query_id", "direction", "rank", "doc_id", "score"))))


def test_every_form_scores_like_plain_json_lines(fitted):
    """The same rows, ranks and scores; the scores to float32 rounding, as a form that splits the corpus
    into other shards batches the documents with other neighbours (padding, matrix shapes)."""
    root, rows = fitted[0], fitted[1]
    expected = scores(fitted, Path(fitted[3].path), "reference")
    assert len(expected) == 2 * 5
    for form in SCORED_FORMATS:
        got = scores(fitted, FORMATS[form](root / form, rows), f"scored-{form}")
        assert [row[:4] for row in got] == [row[:4] for row in expected], form
        assert [row[4] for row in got] == pytest.approx([row[4] for row in expected], rel=1e-5), form


def test_a_bad_row_stops_the_job_with_file_row_and_line(fitted, tmp_path):
    """As a new user meets it: ``jobs.score`` exits 2 with one line naming file, row and line."""
    _, rows, model, _, factors, queries = fitted
    corpus = write_json(tmp_path / "corpus.jsonl.gz", [*rows[:5], {"id": 7, "text": "an id that is a number"}, *rows[5:]])
    command = [sys.executable, "-m", "jobs.score", f"model.path={model.path}", "model.device=cpu",
               f"data.path={corpus}", "data.max_length=16", f"queries.path={queries.path}", f"factors.path={factors.path}",
               "score.rank=4", "score.top_k=3", "score.token_scores=false", "score.progress=false",
               "cluster.num_workers=0", f"output_dir={tmp_path / 'out'}"]
    failed = subprocess.run(command, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        f"ERROR: {corpus} row 5 (line 6): column 'id' must be a string, got int 7")


def test_skipped_bad_rows_are_recorded_and_the_rest_scores_as_without_them(fitted, tmp_path):
    _, rows, model, _, factors, queries = fitted
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(FORMATS["jsonl"](tmp_path / "clean", rows).read_text().replace(
        "\n", '\n{"id": "broken", "text": \n', 1))
    settings = ScoreSettings(rank=4, top_k=4, bottom_k=1, query_batch_size=2, token_scores=False, progress=False)
    summary = run_score(model, DataSettings(path=str(corpus), max_length=16, batch_size=4, on_bad_row="skip"), factors,
                        queries, settings, tmp_path / "out", {})
    record = json.loads(summary.run_record.read_text())
    bad = [skip for skip in record["skips"] if skip["reason"].startswith("bad row")]
    assert len(bad) == 1 and bad[0]["shard"] == str(corpus) and bad[0]["row"] == 1
    assert bad[0]["reason"].startswith("bad row: line 2: invalid JSON")
    table = pq.read_table(summary.scores_path)
    got = sorted(zip(*(table.column(c).to_pylist() for c in ("query_id", "direction", "rank", "doc_id", "score"))))
    assert got == scores(fitted, Path(fitted[3].path), "reference-again")
