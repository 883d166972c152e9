"""A user's mistake, as a new user meets it: one line naming the key or file, exit code 2, no traceback
(unless debug=true or HYDRA_FULL_ERROR=1); the job log has it too."""

from __future__ import annotations

import subprocess

import pytest

from tests.jobs.helpers import overrides, run_job, tiny_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


def test_a_misspelt_key_is_one_line_and_exit_2_with_the_nearest_keys():
    result, _ = run_job("score", "score.topk=3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "ERROR: score.topk: no such key in conf/score.yaml; did you mean score.top_k? (every key: python -m jobs.score --cfg job)"
    ]
    result, _ = run_job("score", "zzz.qqq=3")
    assert result.stderr.splitlines() == [
        "ERROR: zzz.qqq: no such key in conf/score.yaml (every key: python -m jobs.score --cfg job)"
    ]


@pytest.mark.parametrize("override, line", [
    ("model.path=/no/such/model", "ERROR: model.path=/no/such/model: no such directory"),
    ("data.path=/no/such/corpus", "ERROR: data.path=/no/such/corpus: no such file, folder or glob match"),
    ("queries.path=/no/such/queries.jsonl", "ERROR: queries.path=/no/such/queries.jsonl: no such file, folder or glob match"),
    ("score.rank=-1", "ERROR: score.rank=-1: expected a positive integer or null (full rank)"),
])
def test_a_missing_input_or_bad_value_is_reported_before_anything_heavy_starts(override, line, tmp_path):
    result, seconds = run_job("score", override, f"output_dir={tmp_path}")
    assert (result.returncode, result.stderr.splitlines()) == (2, [line])
    # Only the settings are imported: no torch, no demo model, no Ray (25-30 s before these checks moved up).
    assert seconds < 3, seconds
    assert not list(tmp_path.iterdir()), "nothing is written for a job that never started"


def test_an_output_dir_that_cannot_be_written_is_one_line_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result, _ = run_job("score", f"output_dir={blocker}/run")
    assert (result.returncode, result.stderr.splitlines()) == (2, [f"ERROR: output_dir={blocker}/run: {blocker} is a file, not a directory"])
    result, _ = run_job("score", "output_dir=/proc/attribution-run")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["ERROR: output_dir=/proc/attribution-run: cannot write to /proc: No such file or directory"]


def test_a_read_only_folder_inside_output_dir_is_named_before_any_scoring(tmp_path):
    """A read-only mount, since root writes through permission bits."""
    run = tmp_path / "run"
    scores = run / "scores"
    scores.mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", str(scores), str(scores)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(scores)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        result, _ = run_job("score", f"output_dir={run}")
    finally:
        subprocess.run(["umount", str(scores)], check=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"ERROR: output_dir={run}: cannot write to {scores} (its folder scores/): Read-only file system"]


def test_a_missing_factor_store_names_the_key_and_the_command_that_writes_it(inputs, tmp_path):
    result, _ = run_job("score", *overrides(inputs, f"output_dir={tmp_path}"))
    assert result.returncode == 2
    line = (f"ERROR: factors.path={tmp_path}/factors: no factor store there (no manifest.json); fit one with "
            f"`python -m jobs.fit_factors output_dir={tmp_path}`, or set factors.path")
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in result.stderr
    log = (tmp_path / "score.log").read_text()
    assert f"ERROR jobs: {line.removeprefix('ERROR: ')}" in log


def test_debug_true_shows_the_traceback_before_the_line(inputs, tmp_path):
    result, _ = run_job("score", *overrides(inputs, f"output_dir={tmp_path}", "debug=true"))
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "FactorStoreError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ERROR: factors.path=")


# Slow (11 s): test_debug_true_shows_the_traceback_before_the_line keeps the traceback path in the suite.
@pytest.mark.slow
def test_hydra_full_error_re_raises(inputs, tmp_path):
    result, _ = run_job("score", *overrides(inputs, f"output_dir={tmp_path}"), env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "attribution.curvature.store.FactorStoreError: factors.path=" in result.stderr
