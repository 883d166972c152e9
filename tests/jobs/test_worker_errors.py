"""A user's mistake met on a Ray worker reaches the terminal as the same one line it is in process:
no colour codes, actor ids or remote traceback, and not glued to a progress bar."""

from __future__ import annotations

import json
import re

import pytest

from tests.jobs.helpers import run_job, tiny_inputs

TERMINAL_CODE = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker-errors")
    values = tiny_inputs(root)
    fitted, _ = run_job("fit_factors", *[f"{k}={v}" for k, v in values.items() if not k.startswith("queries.")],
                        f"output_dir={root}")
    assert fitted.returncode == 0, fitted.stderr
    return root, values


def error_line(stderr: str) -> str:
    """The job's error line, which must be a line of its own."""
    lines = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# Three Ray jobs, each starting its own workers (a minute): in the slow suite; a user error on one Ray
# worker stays in the suite in tests/curvature/test_nonfinite.py.
@pytest.mark.slow
def test_a_bad_corpus_row_on_fit_and_score_workers_and_a_bad_query_file_are_one_line(inputs, tmp_path):
    root, values = inputs
    bad_corpus = tmp_path / "corpus"
    bad_corpus.mkdir()
    (bad_corpus / "shard.jsonl").write_text('{"id": "doc-a", "text": "the cat sat"}\n{"id": 5, "text": "on a mat"}\n')
    bad_queries = tmp_path / "queries.jsonl"
    bad_queries.write_text(json.dumps({"id": "q-0", "prompt": "the cat"}) + "\n")
    on_ray = {**values, "cluster.num_workers": "2"}
    cases = {
        "fit_factors": ({**on_ray, "data.path": str(bad_corpus)}, f"{bad_corpus / 'shard.jsonl'} row 1 (line 2): column 'id' must be a string"),
        "score": ({**on_ray, "data.path": str(bad_corpus), "factors.path": str(root / "factors")},
                  f"{bad_corpus / 'shard.jsonl'} row 1 (line 2): column 'id' must be a string"),
    }
    for job, (overrides, expected) in cases.items():
        arguments = [f"{k}={v}" for k, v in overrides.items() if job == "score" or not k.startswith("queries.")]
        result, _ = run_job(job, *arguments, f"output_dir={tmp_path / job}")
        assert result.returncode == 2, result.stderr[-3000:]
        line = error_line(result.stderr)
        assert line.startswith(f"ERROR: {expected}"), line
        assert len(line) < 300 and not TERMINAL_CODE.search(line) and "Traceback" not in result.stderr, line
    result, _ = run_job("score", *[f"{k}={v}" for k, v in {**on_ray, "queries.path": str(bad_queries),
                                                             "factors.path": str(root / "factors")}.items()],
                        f"output_dir={tmp_path / 'queries'}")
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert line.startswith(f"ERROR: {bad_queries}") and "completion" in line and len(line) < 300, line
