"""fit_factors then score on a saved mixture-of-experts model, as a user runs them: the experts are scored modules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.jobs.helpers import overrides, run_job, tiny_inputs
from tests.tiny import save_tiny_moe_lm


def test_fit_and_score_a_mixtral_directory_score_every_expert(tmp_path):
    inputs = tiny_inputs(tmp_path / "inputs", save_tiny_moe_lm)
    run = f"output_dir={tmp_path / 'run'}"
    fitted, _ = run_job("fit_factors", *overrides(inputs, run, "progress=false", job="fit_factors"))
    assert fitted.returncode == 0, fitted.stderr
    scored, _ = run_job("score", *overrides(inputs, run, "score.progress=false", "score.top_k=3", "score.layer_scores=true"))
    assert scored.returncode == 0, scored.stderr
    record = json.loads(Path(re.search(r"^run record: (.*)$", scored.stdout, re.MULTILINE)[1]).read_text())
    modules = record["config"]["modules"]
    experts = [f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer in range(2) for e in range(4) for p in ("gate_up_proj", "down_proj")]
    attention = [f"model.layers.{layer}.self_attn.{p}_proj" for layer in range(2) for p in "qkvo"]
    assert sorted(modules) == sorted(experts + attention)
    table = pq.read_table(next((tmp_path / "run" / "scores").glob("*.parquet"))).to_pylist()
    assert table
    is_expert = [".experts." in name for name in modules]
    for row in table:
        assert len(row["layer_scores"]) == len(modules)
        assert row["score"] == pytest.approx(sum(row["layer_scores"]), rel=1e-4, abs=1e-7)
    assert any(score != 0 for row in table for score, expert in zip(row["layer_scores"], is_expert) if expert)
