"""Issue 7's targets on the demo, with conf/evaluate.yaml as it stands (about 11 minutes on two CPU
cores), and EK-FAC against the baselines where the block-diagonal assumption holds (one tracked
module, about 5 minutes): long runs, marked slow and kept out of CI.

    OMP_NUM_THREADS=1 python -m pytest -m slow tests/evaluation/test_demo_targets.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
BASELINES = ("kfac", "lissa", "identity")

pytestmark = pytest.mark.slow


def evaluate(output: Path, *overrides: str) -> tuple[dict[tuple[str, float], dict], dict]:
    """Rows by (method, relative damping), and the resolved config of the run record."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", f"output_dir={output}", "evaluate.progress=false", *overrides],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    (record_path,) = (output / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    rows = pq.read_table(record["outputs"]["metrics"]).to_pylist()
    return {(row["method"], row["relative_damping"]): row for row in rows}, record["config"]["resolved"]


def headline(resolved: dict) -> float:
    return resolved["evaluate"]["damping"]["values"][0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[dict[tuple[str, float], dict], dict]:
    return evaluate(tmp_path_factory.mktemp("evaluate-demo"))


def test_rank_32_gives_the_full_rank_scores(demo_run):
    _, resolved = demo_run
    rank32 = {pair: value for pair, value in resolved["comparisons"].items() if pair.startswith("ekfac_rank32 vs ekfac ")}
    assert rank32 and min(rank32.values()) >= 0.95, rank32


def test_ground_truth_converged_at_every_damping(demo_run):
    _, resolved = demo_run
    residuals = resolved["ground_truth"]["relative_residuals"]
    assert max(max(values) for values in residuals.values()) <= resolved["evaluate"]["ground_truth"]["tolerance"] * 1.01


@pytest.mark.xfail(strict=True, reason="issue 7 is blocked: 0.52 at 10x the mean eigenvalue, tied with K-FAC, LiSSA and the dot "
                                       "product; the exact per-module inverse reaches 0.765, so the error is EK-FAC's approximation "
                                       "inside each module (README, Validation)")
def test_ekfac_tracks_the_exact_product_better_than_the_baselines(demo_run):
    rows, resolved = demo_run
    ekfac = rows[("ekfac", headline(resolved))]["spearman"]
    assert ekfac >= 0.6
    for baseline in BASELINES:
        assert ekfac > rows[(baseline, headline(resolved))]["spearman"] + 0.02, baseline


def test_within_one_module_ekfac_beats_every_baseline(tmp_path):
    """With one tracked module the block-diagonal assumption is exact, and EK-FAC is the best
    approximation of the exact product (measured: 0.74 against at most 0.70 at 10 x the mean
    eigenvalue, 0.51 against at most 0.49 at 1 x)."""
    rows, resolved = evaluate(tmp_path, r"model.tracked_modules=gpt_neox\.layers\.1\.mlp\.dense_h_to_4h",
                              "evaluate.damping.values=[10.0,1.0]", "~evaluate.methods.ekfac_mlp")
    assert resolved["curvature_structure"]["cross_module_share"] == pytest.approx(0.0, abs=1e-9)
    top = rows[("ekfac", headline(resolved))]["spearman"]
    assert top >= 0.6
    for baseline in BASELINES:
        assert top > rows[(baseline, headline(resolved))]["spearman"] + 0.02, baseline
        assert rows[("ekfac", 1.0)]["spearman"] > rows[(baseline, 1.0)]["spearman"], baseline
