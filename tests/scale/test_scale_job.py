"""``jobs.scale`` end to end on the test rehearsal: every stage measured and predicted, kept for a rerun."""

from __future__ import annotations

import json

from tests.jobs.helpers import run_job

SMALL = ("scale.models=[tiny-neox]", "scale.documents=4", "scale.batch_size=2", "scale.sequence=32", "scale.query_tokens=8")
STAGES = ["load model", "probe and fingerprint", "covariance pass", "eigendecomposition", "eigenvalue pass", "save store",
          "load store", "query gradients", "candidate pass", "token scores", "plain forward+backward"]


def test_every_stage_is_measured_and_a_rerun_reuses_the_result(tmp_path):
    result, _ = run_job("scale", *SMALL, f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "tiny-neox-float32.json").read_text())
    rows = record["result"]["rows"]
    assert [row["stage"] for row in rows] == STAGES
    assert all(row["seconds"] >= 0 and row["peak_gib"] >= 0 for row in rows)
    assert all(row["predicted_gib"] > 0 for row in rows if row["stage"] in ("covariance pass", "candidate pass"))
    assert record["result"]["candidate_over_floor"] > 0
    assert "rehearsing tiny-neox" in result.stdout and "candidate pass throughput" in result.stdout
    again, _ = run_job("scale", *SMALL, f"output_dir={tmp_path}")
    assert again.returncode == 0 and "rehearsing" not in again.stdout and "candidate pass throughput" in again.stdout


def test_an_unknown_model_is_one_line(tmp_path):
    result, _ = run_job("scale", "scale.models=[llama-9000]", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["ERROR: scale.models: unknown rehearsal model 'llama-9000'; known: "
                                                 "pythia-160m, llama-1b-block, llama-8b-blocks, tiny-neox, mixtral-small"]
