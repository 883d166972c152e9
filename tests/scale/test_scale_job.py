"""``jobs.scale`` end to end on the test rehearsal: every stage measured and predicted, kept for a rerun."""

from __future__ import annotations

import json

import pytest

from attribution.errors import one_line
from attribution.scale.benchmark import ScaleSettings, run_scale
from attribution.settings import SettingsError
from tests.jobs.helpers import run_job

SMALL = ("scale.models=[tiny-neox]", "scale.documents=4", "scale.batch_size=2", "scale.sequence=32", "scale.query_tokens=8")
STAGES = ["load model", "probe and fingerprint", "covariance pass", "eigendecomposition", "eigenvalue pass", "save store",
          "load store", "query gradients", "candidate pass", "token scores", "refinement", "plain forward+backward"]


def test_every_stage_is_measured_and_a_rerun_reuses_the_result(tmp_path):
    result, _ = run_job("scale", *SMALL, f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "tiny-neox-float32.json").read_text())
    rows = record["result"]["rows"]
    assert [row["stage"] for row in rows] == STAGES
    assert all(row["seconds"] >= 0 and row["peak_gib"] >= 0 for row in rows)
    assert all(row["predicted_gib"] > 0 for row in rows if row["stage"] in ("covariance pass", "candidate pass"))
    assert record["result"]["candidate_over_floor"] > 0
    # The first two queries refined by two CG products each (neither converges in two).
    assert record["result"]["refined_products"] == 2 * 2
    refinement = next(row for row in rows if row["stage"] == "refinement")
    assert refinement["predicted_gib"] > 0
    assert "rehearsing tiny-neox" in result.stdout and "candidate pass throughput" in result.stdout
    # A rerun with the same settings reads the kept result (in this process: one job start is enough).
    said = []
    settings = ScaleSettings(models=("tiny-neox",), documents=4, batch_size=2, sequence=32, queries=4, query_batch_size=16,
                             query_tokens=8, rank=32, device="cpu")
    run_scale(settings, tmp_path, said.append)
    assert not any(line.startswith("rehearsing") for line in said) and "candidate pass throughput" in said[-1]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("normalize", "maybe", "scale.normalize must be true or false, got 'maybe'"),
    ("refine_length", 1, "scale.refine_length must be an integer of at least 2 or null, got 1"),
])
def test_bad_refinement_and_normalize_settings_are_one_line(key, value, message):
    with pytest.raises(SettingsError) as raised:
        ScaleSettings(models=(), documents=1, batch_size=1, sequence=8, queries=1, query_batch_size=1, query_tokens=2,
                      rank=1, device="cpu", **{key: value})
    assert one_line(str(raised.value)) == message


def test_an_unknown_model_is_one_line():
    with pytest.raises(SettingsError) as raised:
        ScaleSettings(models=("llama-9000",), documents=1, batch_size=1, sequence=8, queries=1, query_batch_size=1,
                      query_tokens=2, rank=1, device="cpu")
    assert one_line(str(raised.value)) == ("scale.models: unknown rehearsal model 'llama-9000'; known: "
                                      "pythia-160m, llama-1b-block, llama-8b-blocks, tiny-neox, mixtral-small")
