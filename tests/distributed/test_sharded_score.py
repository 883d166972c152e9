"""Scoring with the model sharded over the Ray workers (``cluster.sharding=fsdp``): the same tables as the
unsharded run, each worker holding about 1/W of the weights, and a worker killed mid-unit."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from attribution.fitting import run_fit
from attribution.models import load_model
from attribution.scoring.run import run_score
from attribution.scoring.shards import FAULT_SWITCH
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    ModelSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm

SHARDED = ClusterSettings(num_workers=2, sharding="fsdp")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four shards of 5, 1, 6 and 4 documents in batches of 2: the workers of a round have different
    numbers of batches (and one round has a single unit), so some keep step with ghost passes."""
    root = tmp_path_factory.mktemp("sharded")
    rows = corpus_rows(16)
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:5], rows[5:6], rows[6:12], rows[12:]])
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "completion": c}) + "\n" for i, (p, c) in
                               enumerate([("the cat sat on", " a mat"), ("dogs ran in", " parks"), ("birds sang over", " hills")])))
    model = ModelSettings(path=str(model_dir), device="cpu", dtype="float64")
    data = DataSettings(path=corpus, batch_size=2, max_length=16)
    store = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    factors = FactorSettings(path=str(store.factors_path))
    score = ScoreSettings(rank=4, top_k=4, bottom_k=2, query_batch_size=2, progress=False)
    reference = run_score(model, data, factors, QuerySettings(str(queries)), score, root / "reference", {})
    return model, data, factors, QuerySettings(str(queries)), score, reference


def scores(summary) -> list[tuple]:
    table = pq.read_table(summary.scores_path).drop_columns(["run_id"]).to_pylist()
    return sorted((r["query_id"], r["direction"], r["rank"], r["doc_id"], round(r["score"], 9),
                   tuple(round(v, 9) for v in r["layer_scores"])) for r in table)


def token_scores(summary) -> list[tuple]:
    table = pq.read_table(summary.token_scores_path).to_pylist()
    return sorted((r["query_id"], r["doc_id"], tuple(r["tokens"]), tuple(round(v, 9) for v in r["token_scores"])) for r in table)


def test_sharded_scores_equal_the_unsharded_run(inputs, ray_local, tmp_path):
    model, data, factors, queries, score, reference = inputs
    sharded = run_score(model, data, factors, queries, score, tmp_path / "sharded", {}, cluster=SHARDED)
    assert scores(sharded) == scores(reference)
    assert token_scores(sharded) == token_scores(reference)
    workers = json.loads(sharded.run_record.read_text())["config"]["workers"]
    total = sum(parameter.numel() for parameter in load_model(model.path)[0].parameters())
    held = [worker["parameters_held"] for worker in workers]
    assert len(held) == 2 and sum(held) == total and max(held) <= 0.6 * total, f"each worker should hold about half: {held}"


@pytest.mark.slow
def test_all_pairs_sharded(inputs, ray_local, tmp_path):
    model, data, factors, queries, _, _ = inputs
    every = ScoreSettings(rank=4, top_k="all", query_batch_size=2, progress=False, token_scores=False)
    unsharded = run_score(model, data, factors, queries, every, tmp_path / "one", {})
    sharded = run_score(model, data, factors, queries, every, tmp_path / "two", {}, cluster=SHARDED)

    def pairs(summary) -> list[tuple]:
        table = pq.read_table(summary.scores_path).to_pylist()
        return sorted((r["query_id"], r["doc_id"], round(r["score"], 9)) for r in table)

    assert len(pairs(unsharded)) == 3 * 16
    assert pairs(sharded) == pairs(unsharded)


# A killed worker is replaced in test_score's suite tests; a killed sharded group: slow suite.
@pytest.mark.slow
def test_a_worker_killed_mid_unit_replaces_the_group(inputs, ray_local, tmp_path, monkeypatch):
    model, data, factors, queries, score, reference = inputs
    shard = sorted(os.listdir(data.path))[2]
    monkeypatch.setenv(FAULT_SWITCH, f"{shard}:1:exit:{tmp_path / 'fired'}")
    survived = run_score(model, data, factors, queries, score, tmp_path / "killed", {}, cluster=SHARDED)
    assert (tmp_path / "fired").exists(), "the worker was never killed: the test did not test anything"
    assert scores(survived) == scores(reference)
    record = json.loads(survived.run_record.read_text())["config"]
    assert record["failed_units"] == []
    assert len(record["lost_workers"]) == 2, "the whole group is replaced"


def test_sharding_needs_ray_workers():
    with pytest.raises(SettingsError, match=r"cluster.sharding='fsdp': expected none when cluster.num_workers=0"):
        ClusterSettings(num_workers=0, sharding="fsdp")
    with pytest.raises(SettingsError, match=r"cluster.sharding='zero': expected one of none, fsdp, deepspeed"):
        ClusterSettings(sharding="zero")


def test_refinement_is_refused_when_sharded(inputs, tmp_path):
    model, data, factors, queries, score, _ = inputs
    with pytest.raises(SettingsError, match=r"refine.method=cg with cluster.sharding=fsdp: the refinement needs the whole model"):
        run_score(model, data, factors, queries, score, tmp_path / "refined", {}, cluster=SHARDED,
                  refine_settings=RefineSettings(method="cg"))


@pytest.mark.slow
def test_deepspeed_zero3_scores_equal_the_unsharded_run(inputs, ray_local, tmp_path):
    """ZeRO-3, the other engine, in float32 (DeepSpeed refuses float64 parameters)."""
    pytest.importorskip("deepspeed")
    model, data, _, queries, score, _ = inputs
    single = ModelSettings(path=model.path, device="cpu", dtype="float32")
    store = run_fit(single, data, FactorSettings(path=str(tmp_path / "factors")), tmp_path / "fit", {}, progress=False)
    factors = FactorSettings(path=str(store.factors_path))
    unsharded = run_score(single, data, factors, queries, score, tmp_path / "one", {})
    sharded = run_score(single, data, factors, queries, score, tmp_path / "two", {},
                        cluster=ClusterSettings(num_workers=2, sharding="deepspeed"))
    expected = {(r["query_id"], r["direction"], r["rank"]): (r["doc_id"], r["score"]) for r in
                pq.read_table(unsharded.scores_path).to_pylist()}
    actual = {(r["query_id"], r["direction"], r["rank"]): (r["doc_id"], r["score"]) for r in
              pq.read_table(sharded.scores_path).to_pylist()}
    assert actual.keys() == expected.keys()
    for key, (doc_id, value) in expected.items():
        assert actual[key][0] == doc_id and actual[key][1] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    held = [worker["parameters_held"] for worker in json.loads(sharded.run_record.read_text())["config"]["workers"]]
    total = sum(parameter.numel() for parameter in load_model(model.path)[0].parameters())
    assert max(held) <= 0.6 * total, f"each worker should hold about half: {held} of {total}"
