"""A scheduler's SIGTERM mid-score: the job stops cleanly (one line, exit 143, no lock left), keeps
its finished units, and the rerun writes the table an uninterrupted run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobs.helpers import ROOT, run_job, tiny_inputs

SHARDS, DOCUMENTS_PER_SHARD = 24, 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    values = tiny_inputs(root)
    words = "the cat sat on a mat while dogs ran in parks near rivers and birds sang".split()
    corpus = root / "long-corpus"
    corpus.mkdir()
    for shard in range(SHARDS):
        rows = [{"id": f"doc-{shard}-{i}", "text": " ".join(words[(shard + i) % 7:(shard + i) % 7 + 8])}
                for i in range(DOCUMENTS_PER_SHARD)]
        pq.write_table(pa.Table.from_pylist(rows), corpus / f"shard-{shard:02d}.parquet")
    values["data.path"] = str(corpus)
    arguments = [f"{key}={value}" for key, value in values.items()]
    fitted, _ = run_job("fit_factors", *[a for a in arguments if not a.startswith("queries.")],
                        f"output_dir={root / 'store'}", "factors.max_sequences=64")
    assert fitted.returncode == 0, fitted.stderr
    arguments += [f"factors.path={root / 'store' / 'factors'}", "score.query_batch_size=1", "score.progress=false"]
    reference, _ = run_job("score", *arguments, f"output_dir={root / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    return arguments, root / "reference"


def rows(output_dir: Path) -> list[tuple]:
    table = pq.read_table(next((output_dir / "scores").glob("*.parquet")))
    return sorted(zip(*(table.column(c).to_pylist() for c in ("query_id", "direction", "rank", "doc_id", "score"))))


def terminated_mid_run(arguments: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    """Start the score job, send SIGTERM once its first unit is on disk, and wait for it to stop."""
    job = subprocess.Popen([sys.executable, "-m", "jobs.score", *arguments, f"output_dir={output_dir}"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not list(output_dir.glob(".work/*/units/*.parquet")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


# A stop and rerun in process and on Ray: the slow suite (test_score's killed-job test resumes in the suite).
@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_score_stops_cleanly_and_the_rerun_gives_the_reference_table(inputs, workers, tmp_path):
    arguments, reference = inputs
    arguments = [*arguments, f"cluster.num_workers={workers}"]
    stopped = terminated_mid_run(arguments, tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == ("STOPPED: stopped by signal SIGTERM: locks released, finished work kept; "
                    "rerun the same command to resume"), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert not list(tmp_path.glob(".work/*/run.lock")), "the run's lock outlived the job"
    kept = len(list(tmp_path.glob(".work/*/units/*.parquet")))
    assert 0 < kept < SHARDS, f"{kept} units on disk: SIGTERM did not land mid-run"
    rerun, _ = run_job("score", *arguments, f"output_dir={tmp_path}")
    assert rerun.returncode == 0, rerun.stderr
    assert rows(tmp_path) == rows(reference)
