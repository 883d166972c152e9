"""Issue 7's targets on the demo, with conf/evaluate.yaml as it stands: a long run (CG ground truth,
about 10 minutes on one CPU core), marked slow and kept out of CI.

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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[dict[tuple[str, float], dict], dict]:
    output = tmp_path_factory.mktemp("evaluate-demo")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", f"output_dir={output}", "evaluate.progress=false"],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    (record_path,) = (output / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    rows = pq.read_table(record["outputs"]["metrics"]).to_pylist()
    return {(row["method"], row["relative_damping"]): row for row in rows}, record["config"]["resolved"]


def test_rank_32_gives_the_full_rank_scores(demo_run):
    _, resolved = demo_run
    rank32 = {pair: value for pair, value in resolved["comparisons"].items() if pair.startswith("ekfac_rank32 vs ekfac ")}
    assert rank32 and min(rank32.values()) >= 0.95, rank32


@pytest.mark.xfail(strict=True, reason="issue 7 is open: measured 0.52 (10x mean eigenvalue), tied with K-FAC, LiSSA and "
                                       "the dot product, against a CG truth that is not converged (README, Validation)")
def test_ekfac_tracks_the_exact_product_better_than_the_baselines(demo_run):
    rows, _ = demo_run
    headline = max(damping for _, damping in rows)
    ekfac = rows[("ekfac", headline)]["spearman"]
    assert ekfac >= 0.6
    for baseline in ("kfac", "lissa", "identity"):
        assert ekfac > rows[(baseline, headline)]["spearman"] + 0.02, baseline
