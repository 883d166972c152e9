"""The evaluate workflow end to end on a tiny model and corpus: in-process, and as the Hydra job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attribution.evaluation.config import (
    DampingSpec,
    EvaluationSettings,
    GroundTruthSpec,
    MethodSpec,
)
from attribution.evaluation.run import run_evaluate
from attribution.evaluation.table import METRICS_SCHEMA
from attribution.settings import DataSettings, ModelSettings, QuerySettings
from tests.tiny import save_tiny_lm

REPO = Path(__file__).resolve().parents[2]
PEOPLE = [("anna", "paris"), ("boris", "rome"), ("clara", "oslo"), ("dmitri", "lima"), ("eva", "cairo")]


def corpus_rows() -> list[dict]:
    rows = []
    for index, (person, city) in enumerate(PEOPLE):
        rows.append({"id": f"fact-{index}", "text": f"{person} was born in {city} ."})
        rows.append({"id": f"para-{index}", "text": f"the birthplace of {person} is {city} ."})
        rows.append({"id": f"noise-{index}", "text": f"{city} has a river and {person} likes tea ."})
    rows += [{"id": f"filler-{i}", "text": f"the weather was {w} that day ."} for i, w in enumerate(["cold", "warm", "wet", "dry"])]
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    rows = corpus_rows()
    corpus = root / "corpus"
    corpus.mkdir()
    for shard in range(2):
        (corpus / f"shard-{shard}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[shard::2]))
    queries = [{"id": f"q-{i}", "prompt": f"{person} was born in", "completion": f" {city}",
                "source_ids": [f"fact-{i}", f"para-{i}"]} for i, (person, city) in enumerate(PEOPLE[:3])]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    model = save_tiny_lm(root / "model", [row["text"] for row in rows])
    return {"root": root, "corpus": corpus, "queries": root / "queries.jsonl", "model": model}


def settings(**overrides) -> EvaluationSettings:
    methods = (
        MethodSpec("ekfac", "ekfac"),
        MethodSpec("ekfac_rank2", "ekfac", rank=2),
        MethodSpec("ekfac_mlp", "ekfac", tracked_modules="mlp"),
        MethodSpec("kfac", "kfac"),
        MethodSpec("identity", "identity"),
        MethodSpec("lissa", "lissa", batch_size=4, max_iterations=3, equal_time_to=None),
        MethodSpec("block", "block_exact"),
        MethodSpec("refined", "refined", steps=300, tolerance=1e-10, curve=(1, 2)),
    )
    values = {"fit_sequences": 12, "num_queries": None, "correlation_documents": 15, "bm25_top": 3, "random_documents": 3,
              "batch_size": 4, "progress": False, "methods": methods, "compare": (("ekfac_rank2", "ekfac"),), **overrides}
    return EvaluationSettings(**values)


def evaluate(inputs, output: str, evaluation: EvaluationSettings):
    return run_evaluate(ModelSettings(path=str(inputs["model"]), dtype="float64", device="cpu"),
                        DataSettings(path=str(inputs["corpus"]), max_length=16), QuerySettings(path=str(inputs["queries"])),
                        evaluation, inputs["root"] / output, {})


def test_dense_ground_truth_run_writes_every_metric(inputs):

    summary = evaluate(inputs, "dense", settings(ground_truth=GroundTruthSpec(kind="dense"),
                                                 damping=DampingSpec(values=(1.0, 10.0))))
    table = pq.read_table(summary.metrics_path)
    assert table.schema.equals(METRICS_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    names = ["dense", "bm25", "ekfac", "ekfac_rank2", "ekfac_mlp", "kfac", "identity", "block", "refined", "refined@1",
             "refined@2", "lissa"]
    assert [row["method"] for row in rows] == names * 2
    assert [row["relative_damping"] for row in rows] == pytest.approx([1.0] * len(names) + [10.0] * len(names))
    for row in rows:
        assert -1.0 <= row["spearman"] <= 1.0 and row["overhead_seconds"] >= 0 and row["pairwise_seconds"] > 0, row
        assert 0 < row["mrr"] <= 1.0 and 0 <= row["recall_at_k"] <= 1.0, row
    # The ground truth against itself.
    assert rows[0]["spearman"] == pytest.approx(1.0) and rows[0]["pearson"] == pytest.approx(1.0)
    # BM25 finds every "X was born in Y" source of "X was born in Y": both sources rank first.
    assert rows[1]["mrr"] == 1.0 and rows[1]["recall_at_k"] == 1.0
    record = json.loads(summary.run_record.read_text())
    assert record["counts"]["queries"] == 3 and record["counts"]["fit_sequences"] == {"model": 12}
    # Refined on the ground truth's own sample to a 1e-10 residual, it is the ground truth; its
    # iterates after 1 and 2 steps are not yet.
    by_name = {row["method"]: row for row in rows[: len(names)]}
    assert by_name["refined"]["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert by_name["refined@1"]["spearman"] < 1.0 - 1e-6 and by_name["refined@2"]["spearman"] < 1.0 - 1e-6
    assert "refined on the ground truth's fit sample" in by_name["refined"]["detail"]
    assert len(record["config"]["resolved"]["comparisons"]) == 2
    # Rerank sets: 2 true sources + 3 BM25 (overlapping) + 3 random, no duplicates.
    assert all(5 <= size <= 8 for size in record["config"]["resolved"]["rerank_sizes"].values())
    assert "dense" in summary.report() and "ekfac_rank2 vs ekfac" in summary.report()
    structure = record["config"]["resolved"]["curvature_structure"]
    assert len(structure["full"]) == 3 and structure["largest_eigenvalue"] > 0
    assert structure["cross_module_share"] == pytest.approx(summary.structure.cross_module_share)
    assert "in cross-module blocks" in summary.report()


@pytest.mark.parametrize("preconditioner", ["ekfac", "none"])
def test_cg_ground_truth_equals_dense_and_is_cached(inputs, preconditioner):
    """CG (EK-FAC-preconditioned, or plain multi-shift) to a 1e-10 residual gives the dense solve's
    metrics at every damping; a rerun reads the cached solution."""
    methods = (MethodSpec("ekfac", "ekfac"), MethodSpec("identity", "identity"))
    damping = DampingSpec(values=(0.3, 3.0))
    spec = GroundTruthSpec(kind="cg", tolerance=1e-10, max_iterations=2000, preconditioner=preconditioner)
    dense = evaluate(inputs, f"dense-{preconditioner}", settings(ground_truth=GroundTruthSpec(kind="dense"), methods=methods,
                                                                 compare=(), damping=damping))
    cg = evaluate(inputs, f"cg-{preconditioner}", settings(ground_truth=spec, methods=methods, compare=(), damping=damping))
    assert [row.method for row in cg.rows] == ["cg", "bm25", "ekfac", "identity"] * 2
    for dense_row, cg_row in zip(dense.rows, cg.rows):
        if cg_row.method != "cg":
            assert cg_row.spearman == pytest.approx(dense_row.spearman, abs=1e-9)
            assert cg_row.pearson == pytest.approx(dense_row.pearson, abs=1e-9)
    truth = json.loads(cg.run_record.read_text())["config"]["resolved"]["ground_truth"]
    assert truth["preconditioner"] == preconditioner
    assert max(max(values) for stage in truth["stages"] for values in stage["relative_residuals"]) < 1e-9
    again = evaluate(inputs, f"cg-{preconditioner}", settings(ground_truth=spec, methods=methods, compare=(), damping=damping))
    assert "cached" in again.rows[0].detail
    assert [row.spearman for row in again.rows] == pytest.approx([row.spearman for row in cg.rows])


@pytest.mark.parametrize("preconditioner", ["ekfac", "none"])
def test_unconverged_ground_truth_still_gives_a_table(inputs, preconditioner):
    """Two CG steps meet neither tolerance: every row is still computed, and for plain CG the snapshot
    of every query is NaN, so the stability check is reported as reached by none (preconditioned CG
    keeps no snapshot)."""
    methods = (MethodSpec("ekfac", "ekfac"), MethodSpec("identity", "identity"))
    spec = GroundTruthSpec(kind="cg", tolerance=1e-12, max_iterations=2, preconditioner=preconditioner)
    summary = evaluate(inputs, f"unconverged-{preconditioner}", settings(ground_truth=spec, methods=methods, compare=(),
                                                                         damping=DampingSpec(values=(0.01,))))
    assert [row.method for row in summary.rows] == ["cg", "bm25", "ekfac", "identity"]
    if preconditioner == "none":
        assert "(0 of 3 queries reached it)" in summary.rows[0].detail
    assert "iterations, relative residual <=" in summary.rows[0].detail
    assert all(-1.0 <= row.spearman <= 1.0 for row in summary.rows)


# The whole shipped study config: slow suite; the runs above check each metric.
@pytest.mark.slow
def test_the_hydra_job_runs_with_the_shipped_config(inputs):
    """``python -m jobs.evaluate`` with conf/evaluate.yaml's methods (LiSSA at equal time included), tiny sizes."""
    output = inputs["root"] / "job"
    overrides = [
        f"model.path={inputs['model']}", f"data.path={inputs['corpus']}", f"queries.path={inputs['queries']}",
        "data.max_length=16", f"output_dir={output}", "model.device=cpu", "evaluate.fit_sequences=8",
        "evaluate.correlation_documents=10", "evaluate.bm25_top=3", "evaluate.random_documents=3", "evaluate.batch_size=4",
        "evaluate.damping.values=[1.0]", "evaluate.ground_truth.max_iterations=50", "evaluate.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", *overrides], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Spearman" in done.stdout and "ekfac_rank32 vs ekfac" in done.stdout
    [metrics] = (output / "metrics").glob("*.parquet")
    methods = pq.read_table(metrics).column("method").to_pylist()
    assert methods[:2] == ["cg", "bm25"] and {"ekfac", "kfac", "identity", "lissa", "ekfac_mlp"} <= set(methods)
