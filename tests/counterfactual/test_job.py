"""``jobs.validate_counterfactual`` on a tiny demo: the table and the top-k removal results, resuming after a
killed run (in process, and on Ray in the slow suite), and the same seeds giving the same LDS."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.jobs.helpers import run_job

# A demo that builds and retrains in well under a second per model.
TINY_DEMO = ("demo.corpus.num_people=6", "demo.corpus.num_cities=3", "demo.corpus.num_companies=2",
             "demo.corpus.num_distractors=12", "demo.corpus.num_fillers=6", "demo.corpus.num_queries=4",
             "demo.corpus.num_finetune_queries=2", "demo.corpus.num_shards=2", "demo.model.hidden_size=16",
             "demo.model.num_layers=1", "demo.model.num_heads=2", "demo.model.intermediate_size=32", "demo.train.epochs=4")
SMALL_RUN = ("lds.subsets=6", "pbrf.documents=2", "pbrf.steps=20", "damping.values=[10.0,1.0]", "damping.methods=[ekfac]",
             "refine_steps.values=[1]", "methods.refined_cg.refine.steps=3", "~methods.refined_stochastic", "~methods.kfac",
             "removal.queries=2", "methods.bm25_then_ekfac.prefilter.top_m=5", "progress=false")


def validate(tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    result, _ = run_job("validate_counterfactual", f"output_dir={tmp_path / 'out'}", *TINY_DEMO, *SMALL_RUN, *extra,
                        env={"ATTRIBUTION_CACHE": str(tmp_path / "cache"), **(env or {})})
    return result


def latest_record(tmp_path: Path) -> dict:
    return json.loads(sorted((tmp_path / "out" / "runs").glob("*.json"))[-1].read_text())


def lds_by_row(record: dict) -> dict[tuple[str, str], float]:
    return {(row["method"], row["damping"]): row["lds"] for row in record["config"]["results"]["rows"]}


# On Ray every method's fit and score run starts its own workers: minutes on two loaded cores.
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_run_resumes_without_retraining_and_same_seeds_give_the_same_lds(tmp_path, workers):
    # Killed (the process exits) while training the third model: the first two are kept.
    killed = validate(tmp_path, "cluster.num_workers=0", env={"ATTRIBUTION_TEST_FAULT": "retrain:2:exit"})
    assert killed.returncode == 17, killed.stderr[-2000:]
    kept = list((tmp_path / "out" / "retrain").glob("*/subset-*"))
    assert len(kept) == 2 and all((folder / "retrained.json").is_file() for folder in kept)

    resumed = validate(tmp_path, f"cluster.num_workers={workers}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = latest_record(tmp_path)
    assert first["counts"]["models"] == 6
    assert (first["counts"]["models_trained"], first["counts"]["models_kept"]) == (4, 2)
    assert "retraining: 6 models (4 trained by this run, 2 kept)" in resumed.stdout

    again = validate(tmp_path, "cluster.num_workers=0")
    assert again.returncode == 0, again.stderr[-3000:]
    second = latest_record(tmp_path)
    assert second["counts"]["models_trained"] == 0
    # Top-k removal: every ranking's loss increase, from models kept by the first complete run.
    removal = second["config"]["results"]["removal"]
    assert removal["k"] == 1 and len(removal["query_ids"]) == 2
    assert removal["results"] == first["config"]["results"]["removal"]["results"]
    assert [r["ranking"] for r in removal["results"]] == ["ekfac", "refined_cg", "identity", "cosine", "bm25",
                                                          "bm25_then_ekfac", "random"]
    assert all(math.isfinite(r["mean"]) and r["low"] <= r["mean"] <= r["high"] for r in removal["results"])
    assert not any(m["trained"] for m in removal["models"]) and removal["models"][0]["training_set"] == 0
    assert "top-k removal: increase of -log p(completion | prompt)" in again.stdout and "| random | 1 | 2 |" in again.stdout
    assert lds_by_row(second) == lds_by_row(first)
    assert second["config"]["results"]["measurements"] == first["config"]["results"]["measurements"]

    table = pq.read_table(second["outputs"]["table"]).to_pylist()
    rows = {(row["method"], row["damping"]) for row in table}
    assert rows == {("ekfac", "10x"), ("refined_cg", "10x"), ("identity", "-"), ("cosine", "-"), ("bm25", "-"),
                    ("bm25_then_ekfac", "10x"), ("ekfac", "1x"), ("refined_cg@1", "10x")}
    for row in table:
        assert math.isfinite(row["lds"]) and row["lds_low"] <= row["lds"] <= row["lds_high"]
        # The PBRF is solved at the headline damping: rows at another damping have no agreement.
        assert math.isfinite(row["pbrf_spearman"]) == (row["damping"] != "1x")
        # Damped methods are compared with the PBRF in scale too; the dot product and BM25 only in rank.
        assert math.isfinite(row["pbrf_relative_error"]) == (row["method"] not in ("identity", "cosine", "bm25")
                                                             and row["damping"] != "1x")
    refined = next(row for row in table if row["method"] == "refined_cg")
    assert "cg: 3-3 products" in refined["detail"]
    # Every method's pairs dataset is recorded, for a user to read every pair's score.
    assert all(Path(path).is_dir() for path in second["config"]["results"]["pairs"].values())
    # BM25 then EK-FAC: each query's 5 candidates carry the full EK-FAC run's scores (float32, other batches), nothing else.
    pairs = second["config"]["results"]["pairs"]
    full, prefiltered = (pairs_by_query(pairs[name]) for name in ("ekfac (10x)", "bm25_then_ekfac (10x)"))
    assert set(prefiltered) == set(full) and all(len(pairs) == 5 for pairs in prefiltered.values())
    for query_id, pairs in prefiltered.items():
        assert all(score == pytest.approx(full[query_id][doc_id], rel=1e-5) for doc_id, score in pairs.items())
    assert "bm25 top-5 candidates scored" in next(row for row in table if row["method"] == "bm25_then_ekfac")["detail"]


def pairs_by_query(path: str) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = {}
    for row in ds.dataset(path, format="parquet", partitioning="hive").to_table(["query_id", "doc_id", "score"]).to_pylist():
        result.setdefault(row["query_id"], {})[row["doc_id"]] = row["score"]
    return result


def test_bad_settings_are_one_line_and_exit_2(tmp_path):
    for override, key in (("+methods.bad={kind: nope}", "methods.bad.kind"), ("model.path=/nowhere", "model.path")):
        result = validate(tmp_path, override)
        assert result.returncode == 2, (override, result.stderr[-2000:])
        assert key in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("values, key", [
    ({"lds": {"fraction": 1.5}}, "lds.fraction"), ({"refine_steps": {"method": "identity"}}, "refine_steps.method"),
    ({"removal": {"fraction": 0}}, "removal.fraction"), ({"retrain_batches": "shuffled"}, "retrain_batches='shuffled'"),
    ({"methods": {"m": {"kind": "ekfac", "prefilter": {"kind": "bm25", "top_m": 0}}}}, "methods.m.prefilter.top_m"),
])
def test_settings_errors_name_the_key(values, key):
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import SettingsError

    methods = {"identity": {"kind": "identity"}, "ekfac": {"kind": "ekfac"}}
    with pytest.raises(SettingsError, match=re.escape(key)):
        CounterfactualSettings.from_config({"methods": methods, "damping": {"methods": []}, **values})


def test_an_unknown_benchmark_names_the_choices():
    from attribution.counterfactual.benchmarks import prepare_benchmark
    from attribution.settings import SettingsError

    with pytest.raises(SettingsError, match="benchmark='nope': expected one of demo, natural_text"):
        prepare_benchmark("nope", {}, {})


NO_SWEEPS = {"damping": {"methods": []}, "refine_steps": {"values": []}}


def test_a_prefilter_goes_before_an_influence_method_only():
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import SettingsError

    for spec, key in (({"kind": "bm25", "prefilter": {"kind": "bm25"}}, "methods.m.prefilter.kind=bm25"),
                      ({"kind": "ekfac", "prefilter": {"kind": "bm25", "path": "/tmp/i"}}, "methods.m.prefilter.path"),
                      ({"kind": "identity", "prefilter": {"kind": "gradient"}}, "methods.m.prefilter.kind=gradient")):
        with pytest.raises(SettingsError, match=key):
            CounterfactualSettings.from_config({"methods": {"m": spec}, **NO_SWEEPS})
    method = {"kind": "ekfac", "prefilter": {"kind": "bm25", "top_m": 7}}
    settings = CounterfactualSettings.from_config({"methods": {"m": method}, **NO_SWEEPS})
    assert (settings.methods[0].prefilter.kind, settings.methods[0].prefilter.top_m) == ("bm25", 7)
