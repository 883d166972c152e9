"""The scoring pool on Ray and in-process: same tables for any worker count and pass size, workers and
drivers killed mid-unit and mid-query-batch, a shard that keeps failing, a data error that fails at once,
two identical runs at once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data.corpus import DataError
from attribution.fitting import run_fit
from attribution.scoring.run import ScoreRunLocked, ShardFailure, run_score
from attribution.scoring.shards import FAULT_SWITCH
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    ModelSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
)
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


# Slow (24 s): the suite keeps a killed worker's pool giving the uninterrupted table in
# test_multinode.py::test_a_node_killed_mid_score_leaves_the_table_of_an_uninterrupted_run.
@pytest.mark.slow
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


def test_the_default_refinement_runs_on_the_pool_as_in_process(inputs, ray_local, tmp_path):
    # refine.method=auto (the jobs' default) is CG for a fitted store: the pool's workers refine each
    # query batch exactly as one process does with refine.method=cg.
    root, model, data, factors, queries, score, reference = inputs
    pooled = run_score(model, data, factors, queries, score, tmp_path / "pool", {}, cluster=ClusterSettings(num_workers=2),
                       refine_settings=RefineSettings(method="auto", steps=3))
    local = run_score(model, data, factors, queries, score, tmp_path / "local", {},
                      refine_settings=RefineSettings(method="cg", steps=3))
    assert rows(pooled) == rows(local) != rows(reference)
    assert json.loads(pooled.run_record.read_text())["config"]["resolved_settings"]["refine"]["method"] == "cg"
    assert "refined by cg, at most 3 steps" in pooled.line() and "closed form" in reference.line()


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
               "refine.method=none", "cluster.num_workers=0", f"output_dir={output}"]
    shard = sorted(os.listdir(data.path))[2]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_SWITCH: f"{shard}:1:exit"}
    killed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert not (output / "scores").exists()
    markers = list((output / ".work").glob("*/units/*.parquet"))
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


def pairs(summary):
    table = pq.read_table(summary.scores_path).to_pylist()
    return sorted((r["query_id"], r["doc_id"], r["shard"], r["row"], round(r["score"], 5)) for r in table)


# The pool's tables are checked in the suite by test_multinode.py's killed-node test; every pass size: slow suite.
@pytest.mark.slow
def test_pool_gives_the_same_tables_for_any_pass_size_and_all_pairs(inputs, ray_local, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    two_per_pass = replace(score, query_batches_per_pass=2)
    pooled = run_score(model, data, factors, queries, two_per_pass, tmp_path / "pass", {}, cluster=ClusterSettings(num_workers=2))
    assert rows(pooled) == rows(reference) and pooled.counts["passes"] == 1
    tokens = pq.read_table(pooled.token_scores_path).to_pylist()
    reference_tokens = pq.read_table(reference.token_scores_path).to_pylist()
    assert sorted((t["query_id"], t["doc_id"]) for t in tokens) == sorted((t["query_id"], t["doc_id"]) for t in reference_tokens)
    all_pairs = replace(score, top_k="all")
    in_process = run_score(model, data, factors, queries, all_pairs, tmp_path / "pairs-local", {})
    on_ray = run_score(model, data, factors, queries, all_pairs, tmp_path / "pairs-ray", {}, cluster=ClusterSettings(num_workers=2))
    assert pairs(on_ray) == pairs(in_process) and len(pairs(in_process)) == 3 * 16
    record = json.loads(on_ray.run_record.read_text())
    assert record["config"]["driver_peak_memory_mib"] > 0 and len(record["config"]["workers"]) == 2


@pytest.mark.slow
def test_a_killed_worker_mid_pairs_and_mid_query_batch(inputs, ray_local, tmp_path, monkeypatch):
    root, model, data, factors, queries, score, reference = inputs
    all_pairs = replace(score, top_k="all")
    expected = pairs(run_score(model, data, factors, queries, all_pairs, tmp_path / "reference", {}))
    shard = sorted(os.listdir(data.path))[2]
    monkeypatch.setenv(FAULT_SWITCH, f"{shard}:1:exit:{tmp_path / 'fired-unit'}")
    survived = run_score(model, data, factors, queries, all_pairs, tmp_path / "unit", {}, cluster=ClusterSettings(num_workers=2))
    assert (tmp_path / "fired-unit").exists() and pairs(survived) == expected
    assert not list(survived.scores_path.rglob(".*")), "no staging file of the killed attempt is published"
    monkeypatch.setenv(FAULT_SWITCH, f"query-batch:1:exit:{tmp_path / 'fired-query'}")
    survived = run_score(model, data, factors, queries, score, tmp_path / "query", {}, cluster=ClusterSettings(num_workers=2))
    assert (tmp_path / "fired-query").exists() and rows(survived) == rows(reference)


def job_command(model, data, factors, queries, output, *extra):
    return [sys.executable, "-m", "jobs.score", f"model.path={model.path}", "model.device=cpu", f"data.path={data.path}",
            "data.batch_size=2", "data.max_length=16", f"queries.path={queries.path}", f"factors.path={factors.path}",
            "score.rank=4", "score.bottom_k=2", "score.query_batch_size=2", "score.progress=false",
            "refine.method=none", "cluster.num_workers=0", f"output_dir={output}", *extra]


# test_killed_job_resumes_without_duplicates covers resuming in the suite; the driver kill: slow suite.
@pytest.mark.slow
def test_a_killed_driver_resumes_query_batches_and_pairs(inputs, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    output = tmp_path / "job"
    command = job_command(model, data, factors, queries, output, "score.top_k=all")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_SWITCH: "query-batch:1:exit"}
    killed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert len(list((output / ".work").glob("*/queries/*.safetensors"))) == 1
    shard = sorted(os.listdir(data.path))[2]
    environment[FAULT_SWITCH] = f"{shard}:1:exit"
    killed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    del environment[FAULT_SWITCH]
    resumed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert record["counts"]["query_batches_resumed"] == 2 and record["counts"]["units_resumed"] == 2
    (dataset,) = list((output / "pairs").iterdir())
    table = pq.read_table(dataset).to_pylist()
    expected = pairs(run_score(model, data, factors, queries, replace(score, top_k="all"), tmp_path / "reference", {}))
    assert sorted((r["query_id"], r["doc_id"], r["shard"], r["row"], round(r["score"], 5)) for r in table) == expected


def test_a_data_error_in_a_unit_fails_at_once_with_its_own_message(inputs, ray_local, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    corpus = tmp_path / "corpus"
    shutil.copytree(data.path, corpus)
    bad = corpus / sorted(os.listdir(corpus))[1]
    rows_of_bad = pq.read_table(bad).to_pylist()
    pq.write_table(pa.Table.from_pylist(rows_of_bad + [{"id": None, "text": "the cat"}]), bad)
    broken = replace(data, path=str(corpus))
    for cluster in (ClusterSettings(num_workers=0, max_retries=5), ClusterSettings(num_workers=2, max_retries=5)):
        started = time.perf_counter()
        with pytest.raises(DataError, match=f"{bad} row {len(rows_of_bad)}: column 'id' is null"):
            run_score(model, broken, factors, queries, score, tmp_path / f"out-{cluster.num_workers}", {}, cluster=cluster)
        assert time.perf_counter() - started < 120


def test_two_identical_runs_never_write_twice(inputs, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    output = tmp_path / "race"
    command = job_command(model, data, factors, queries, output, "score.top_k=4")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, env=environment, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    scored = [r for r in results if r[0] == 0 and "scored" in r[1] and "already" not in r[1]]
    assert len(scored) == 1, results
    other = next(r for r in results if r is not scored[0])
    assert "already scored with the same inputs" in other[1] or "another score run holds the lock" in other[2], other
    assert len(list((output / "scores").glob("*.parquet"))) == 1


def test_a_held_lock_refuses_and_a_stale_one_is_taken_over(inputs, tmp_path):
    root, model, data, factors, queries, score, reference = inputs
    first = run_score(model, data, factors, queries, score, tmp_path / "locked", {})
    (work,) = list((tmp_path / "locked" / ".work").iterdir())
    (work / "complete.json").unlink()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00",
             "command": "jobs.score", "token": "t"}
    (work / "run.lock").write_text(json.dumps(owner))
    with pytest.raises(ScoreRunLocked, match=f"another score run holds the lock {work / 'run.lock'}: pid {os.getpid()}.*is running"):
        run_score(model, data, factors, queries, score, tmp_path / "locked", {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "run.lock").write_text(json.dumps({**owner, "pid": dead.pid}))
    again = run_score(model, data, factors, queries, score, tmp_path / "locked", {})
    assert not again.reused and rows(again) == rows(first)
    record = json.loads(again.run_record.read_text())
    assert any("stale" in message for message in record["config"]["lock_messages"])
