"""Leave-one-out retraining against what ``jobs.validate_counterfactual`` reports for its top documents.

The demo is shrunk until retraining is cheap and trained full-batch to (near) convergence, where
influence functions apply: one batch per step, so leaving a document out changes only its own
contribution, not the order the others are seen in. Leaving document z out changes every query's
measurement by the same "less data" shift plus z's own effect, so only statements that a common
shift cannot change are asserted: per query, the job's top document moves the measurement more
than its bottom documents do, and in the direction of its score.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest

from attribution.counterfactual.measure import measure_queries
from attribution.counterfactual.retrain import Recipe, RetrainTask, queries_key, retrain_and_measure
from attribution.counterfactual.subsets import Subset
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.demo.train import DemoConfig
from attribution.evaluation.metrics import spearman
from attribution.models import load_model
from tests.counterfactual.test_job import TINY_DEMO
from tests.jobs.helpers import run_job

CONVERGED = ("demo.train.batch_size=64", "demo.train.epochs=200", "demo.model.hidden_size=32", "demo.model.intermediate_size=64")
EXTREMES = 2  # top and bottom documents retrained without, per query


@pytest.mark.slow
def test_top_documents_agree_with_leave_one_out_retraining(tmp_path):
    result, _ = run_job("validate_counterfactual", f"output_dir={tmp_path / 'out'}", *TINY_DEMO, *CONVERGED, "lds.subsets=3",
                        "pbrf.documents=0", "damping.values=[10.0]", "damping.methods=[]", "refine_steps.values=[]",
                        "methods.refined_cg.refine.steps=30",
                        *(f"~methods.{name}" for name in ("ekfac", "refined_stochastic", "kfac", "identity", "bm25")), "cluster.num_workers=0",
                        "progress=false", env={"ATTRIBUTION_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    resolved = record["config"]["resolved"]
    corpus, queries, max_length = resolved["data"]["path"], resolved["queries"]["path"], resolved["data"]["max_length"]
    demo = DemoConfig.from_dict(record["config"]["demo"])
    recipe = Recipe(demo.model, demo.train, demo.fingerprint(), resolved["model"]["path"], corpus)
    doc_ids = [doc.id for doc in iter_documents(list_shards(corpus), "id", "text", on_skip=pytest.fail)]
    key = queries_key(queries, max_length)

    def measured_without(left_out: str | None) -> dict[str, float]:
        kept = tuple(d for d in doc_ids if d != left_out)
        index = len(doc_ids) if left_out is None else doc_ids.index(left_out)
        task = RetrainTask(recipe, Subset(index, kept), 0, str(tmp_path / "loo"), queries, key, max_length, index)
        return retrain_and_measure(task).measurements

    full = measured_without(None)
    # The recipe rerun on the whole corpus is the demo model being attributed.
    model, tokenizer = load_model(resolved["model"]["path"])
    demo = measure_queries(model, tokenizer, read_queries(queries, on_skip=pytest.fail), max_length, pytest.fail)
    assert demo.keys() == full.keys()
    np.testing.assert_allclose([full[q] for q in demo], list(demo.values()), rtol=1e-4, atol=1e-4)

    path = record["config"]["results"]["pairs"]["refined_cg (10x)"]
    pairs = ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()
    agreements = []
    for query_id, base in full.items():
        ranked = sorted((row for row in pairs if row["query_id"] == query_id), key=lambda row: -row["score"])
        chosen = ranked[:EXTREMES] + ranked[-EXTREMES:]
        effects = [base - measured_without(row["doc_id"])[query_id] for row in chosen]
        scores = [row["score"] for row in chosen]
        top, bottom = effects[0], effects[EXTREMES:]
        assert scores[0] > 0 and top > 0, (query_id, scores, effects)
        assert top > max(bottom), (query_id, scores, effects)
        agreements.append(spearman(np.array(scores), np.array(effects)))
    assert np.mean(agreements) > 0.3, agreements
