"""The scoring pool on Ray: same table as in-process, a worker killed mid-shard, a job killed and rerun,
a shard that keeps failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from attribution.fitting import run_fit
from attribution.scoring.run import ShardFailure, run_score
from attribution.scoring.shards import FAULT_SWITCH
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rows = corpus_rows(16)
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:5], rows[5:6], rows[6:12], rows[12:]])
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "completion": c}) + "\n" for i, (p, c) in
                               enumerate([("the cat sat on", " a mat"), ("dogs ran in", " parks"), ("birds sang over", " hills")])))
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=corpus, batch_size=2, max_length=16)
    store = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    factors = FactorSettings(path=str(store.factors_path))
    score = ScoreSettings(rank=4, top_k=4, bottom_k=2, query_batch_size=2, progress=False)
    reference = run_score(model, data, factors, QuerySettings(str(queries)), score, root / "reference", {})
    return root, model, data, factors, QuerySettings(str(queries)), score, reference


def rows(summary):
    table = pq.read_table(summary.scores_path).drop_columns(["run_id"]).to_pylist()
    return sorted((r["query_id"], r["direction"], r["rank"], r["doc_id"], round(r["score"], 4)) for r in table)


def test_pool_equals_in_process_and_survives_a_killed_worker(inputs, ray_local, tmp_path, monkeypatch):
    root, model, data, factors, queries, score, reference = inputs
    pooled = run_score(model, data, factors, queries, score, tmp_path / "pool", {}, cluster=ClusterSettings(num_workers=2))
    assert rows(pooled) == rows(reference)
    shard = sorted(os.listdir(data.path))[2]
    monkeypatch.setenv(FAULT_SWITCH, f"{shard}:1:exit:{tmp_path / 'fired'}")
    survived = run_score(model, data, factors, queries, score, tmp_path / "killed", {}, cluster=ClusterSettings(num_workers=2))
    assert (tmp_path / "fired").exists(), "the worker was never killed: the test did not test anything"
    assert rows(survived) == rows(reference)
    record = json.loads(survived.run_record.read_text())
    assert record["config"]["failed_units"] == []


def test_shard_that_keeps_failing(inputs, tmp_path, monkeypatch):
    root, model, data, factors, queries, score, reference = inputs
    shard = sorted(os.listdir(data.path))[0]
    monkeypatch.setenv(FAULT_SWITCH, f"{shard}:0:raise")
    in_process = ClusterSettings(num_workers=0, max_retries=1)
    with pytest.raises(ShardFailure, match=f"2 unit\\(s\\) failed on every attempt \\(shards: .*{shard}\\)"):
        run_score(model, data, factors, queries, score, tmp_path / "strict", {}, cluster=in_process)
    assert not (tmp_path / "strict" / "scores").exists()
    allowed = ClusterSettings(num_workers=0, max_retries=1, allow_failed_shards=True)
    partial = run_score(model, data, factors, queries, score, tmp_path / "allowed", {}, cluster=allowed)
    record = json.loads(partial.run_record.read_text())
    assert {u["shard"] for u in record["config"]["failed_units"]} == {os.path.join(data.path, shard)}
    assert "injected test fault" in record["config"]["failed_units"][0]["error"]
    assert all(row["shard"] != os.path.join(data.path, shard) for row in pq.read_table(partial.scores_path).to_pylist())


def test_killed_job_resumes_without_duplicates(inputs, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    output = tmp_path / "job"
    command = [sys.executable, "-m", "jobs.score", f"model.path={model.path}", "model.device=cpu", f"data.path={data.path}",
               "data.batch_size=2", "data.max_length=16", f"queries.path={queries.path}", f"factors.path={factors.path}",
               "score.rank=4", "score.top_k=4", "score.bottom_k=2", "score.query_batch_size=2", "score.progress=false",
               "cluster.num_workers=0", f"output_dir={output}"]
    shard = sorted(os.listdir(data.path))[2]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_SWITCH: f"{shard}:1:exit"}
    killed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert not (output / "scores").exists()
    markers = list((output / ".work").rglob("*.parquet"))
    assert len(markers) == 2, "the shards before the killed one kept their markers"
    del environment[FAULT_SWITCH]
    resumed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (part,) = list((output / "scores").glob("*.parquet"))
    record = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert record["counts"]["units_resumed"] == 2 and record["counts"]["units"] == 8
    table = pq.read_table(part).drop_columns(["run_id"]).to_pylist()
    assert sorted((r["query_id"], r["direction"], r["rank"], r["doc_id"], round(r["score"], 4)) for r in table) == rows(reference)
    again = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already scored with the same inputs" in again.stdout, again.stderr[-2000:]
    assert list((output / "scores").glob("*.parquet")) == [part]
    assert len(list((output / "runs").glob("*.json"))) == 1


def test_finished_run_is_read_back_not_repeated(inputs):
    root, model, data, factors, queries, score, reference = inputs
    again = run_score(model, data, factors, queries, score, root / "reference", {})
    assert again.reused and not reference.reused
    assert (again.run_id, again.scores_path, again.run_record) == (reference.run_id, reference.scores_path, reference.run_record)
    assert {q: [(r.rank, r.doc_id, round(r.score, 6)) for r in rows] for q, rows in again.top.items()} == \
        {q: [(r.rank, r.doc_id, round(r.score, 6)) for r in rows] for q, rows in reference.top.items()}
    assert len(list((root / "reference" / "scores").glob("*.parquet"))) == 1
