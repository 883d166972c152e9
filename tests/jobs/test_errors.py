"""A user's mistake, as a new user meets it: one line naming the key or file, exit code 2, no traceback
(unless debug=true or HYDRA_FULL_ERROR=1); the job log has it too."""

from __future__ import annotations

import pytest

from tests.jobs.helpers import overrides, run_job, tiny_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


def test_a_misspelt_key_is_one_line_and_exit_2():
    result, _ = run_job("score", "score.rnk=3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "ERROR: score.rnk: no such key in conf/score.yaml (every key: python -m jobs.score --cfg job)"
    ]


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


def test_hydra_full_error_re_raises(inputs, tmp_path):
    result, _ = run_job("score", *overrides(inputs, f"output_dir={tmp_path}"), env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "attribution.curvature.store.FactorStoreError: factors.path=" in result.stderr
