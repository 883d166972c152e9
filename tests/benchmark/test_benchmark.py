"""The benchmark code runs and measures what it says (figures are reported, never asserted as timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from attribution.benchmark import benchmark_model, format_rows, gpt_neox_from_config
from attribution.benchmark_runs import (
    REPOSITORY,
    agreement,
    benchmark_inputs,
    fit_job,
    kronfluence_available,
    kronfluence_job,
    score_job,
)
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.demo.train import ensure_demo

TINY = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64}


def test_throughput_rows_and_the_dense_factor_budget():
    rows = benchmark_model("tiny", gpt_neox_from_config(**TINY), [1, 70], [4], batch_size=2, length=16, num_batches=2,
                           warmup=1, repeats=1, device=torch.device("cpu"))
    assert [r.step for r in rows] == ["plain f+b", "fit: covariance", "fit: eigenvalues", "score", "score"]
    assert all(r.ratio > 0 and r.documents_per_second > 0 for r in rows) and rows[0].ratio == 1.0
    assert rows[-1].queries == 70 and rows[-1].per_document_modules > 0  # 70 queries: two chunks of factors
    starved = benchmark_model("tiny", gpt_neox_from_config(**TINY), [70], [4], 2, 16, 1, 0, 1, torch.device("cpu"),
                              dense_factors_mib=0, fitting=False)
    assert starved[-1].per_document_modules == 0, "no budget for dense factors: every module keeps the low-rank contraction"
    assert "per-doc modules" in format_rows(rows)


def test_benchmark_inputs_have_the_sizes_asked_for(tmp_path):
    demo = ensure_demo()
    inputs = benchmark_inputs(tmp_path, demo.model_dir, demo.corpus_dir, demo.queries_path, 1000, 40, 3)
    documents = list(iter_documents(list_shards(inputs.corpus), on_skip=lambda skip: None))  # ids must be unique
    assert len(documents) == 1000 and len(list_shards(inputs.corpus)) == 3
    assert len(read_queries(inputs.queries, on_skip=lambda skip: None)) == 40


@pytest.mark.slow
def test_side_by_side_with_kronfluence_agrees(tmp_path):
    if not kronfluence_available():
        pytest.skip("kronfluence is not installed (the bench extra)")
    demo = ensure_demo()
    inputs = benchmark_inputs(tmp_path, demo.model_dir, demo.corpus_dir, demo.queries_path, 200, 6, 2)
    fit_job("fit", inputs, tmp_path / "factors", tmp_path / "fit", "factors.max_sequences=200")
    ours = score_job("pairs", inputs, tmp_path / "factors", tmp_path / "pairs", "score.top_k=all", "cluster.num_workers=0",
                     "score.token_scores=false")
    peer, summary = kronfluence_job(inputs, tmp_path / "kronfluence", 32, 128, 8, 6, 200, 10)
    assert summary["documents"] == 200 and summary["queries"] == 6 and peer.timings["score"] > 0
    assert agreement(ours.output / "pairs", tmp_path / "kronfluence") > 0.6
    assert pq.read_table(ours.output / "pairs").num_rows == 1200


@pytest.mark.slow
def test_the_gpu_script_dry_run(tmp_path):
    done = subprocess.run(["bash", str(REPOSITORY / "benchmarks" / "gpu.sh"), "--dry-run", "--output", str(tmp_path)],
                          cwd=REPOSITORY, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((Path(tmp_path) / "gpu.json").read_text())
    assert {r["dtype"] for r in result["throughput"]} == {"float32", "bfloat16"}
    assert [run["dtype"] for run in result["end_to_end"]] == ["float32", "bfloat16"]
    for dtype in ("bfloat16", "float32"):
        rows = json.loads((Path(tmp_path) / "scale" / f"tiny-neox-{dtype}.json").read_text())["result"]["rows"]
        assert {"covariance pass", "candidate pass"} <= {row["stage"] for row in rows}
