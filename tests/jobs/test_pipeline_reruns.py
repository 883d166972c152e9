"""``jobs.pipeline`` as a user reruns it: the factor store is reused when nothing it was fitted from
changed; an all-pairs run is refused before any work; skips and oversized top-k are said on the console."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.jobs.helpers import overrides, run_job, tiny_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("pipeline"))


# What is reused is the factor store; the queries' refinement would only add its seconds to each run.
CLOSED_FORM = "refine.method=none"


def pipeline(inputs, output_dir, *extra):
    result, _ = run_job("pipeline", *overrides(inputs, f"output_dir={output_dir}", *extra, job="pipeline"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def fit_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "factor" in line and ("fitted" in line or "reused" in line))


def test_a_rerun_reuses_the_store_until_the_model_corpus_or_settings_change(inputs, tmp_path):
    manifest = tmp_path / "factors" / "manifest.json"
    assert fit_line(pipeline(inputs, tmp_path, CLOSED_FORM)).startswith("fitted factors on 10 sequences")
    created = json.loads(manifest.read_text())["created"]
    reused = fit_line(pipeline(inputs, tmp_path, CLOSED_FORM))
    assert reused.startswith(f"reused the factor store {tmp_path / 'factors'}, fitted {created} on 10 sequences"), reused
    assert json.loads(manifest.read_text())["created"] == created
    assert fit_line(pipeline(inputs, tmp_path, CLOSED_FORM, "refit=true")).startswith("fitted factors")
    # The damping is applied when scoring: the store is the same.
    assert fit_line(pipeline(inputs, tmp_path, CLOSED_FORM, "factors.damping=0.5")).startswith("reused the factor store")
    assert fit_line(pipeline(inputs, tmp_path, CLOSED_FORM, "factors.seed=3")).startswith("fitted factors")
    shard = sorted(Path(inputs["data.path"]).glob("*.parquet"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert fit_line(pipeline(inputs, tmp_path, CLOSED_FORM, "factors.seed=3")).startswith("fitted factors")


def test_all_pairs_is_refused_before_any_work(inputs, tmp_path):
    result, _ = run_job("pipeline", *overrides(inputs, f"output_dir={tmp_path}", "score.top_k=all", job="pipeline"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("ERROR: score.top_k=all: the pipeline ends in a report")
    assert not (tmp_path / "factors").exists()


def test_skips_and_a_top_k_beyond_the_corpus_are_said_on_the_console(inputs, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q-ok", "prompt": "the cat sat", "completion": " on a mat"}) + "\n"
                       + json.dumps({"id": "q-long", "prompt": "the cat sat " * 8, "completion": " on a mat"}) + "\n")
    stdout = pipeline(inputs, tmp_path, f"queries.path={queries}", "score.top_k=50", "score.bottom_k=5")
    run_record = next((tmp_path / "runs").glob("*-score-*.json"))
    assert f"skipped 1 queries or documents, each with its file, row and reason in the run record {run_record}" in stdout
    assert ("note: score.top_k=50 is more than the 10 documents each query is ranked against: every document is kept, "
            "and the 5 bottom rows repeat documents of the top rows") in stdout
    skip = json.loads(run_record.read_text())["skips"][0]
    assert (skip["item_id"], skip["shard"], skip["row"]) == ("q-long", str(queries), 1), skip
