"""``python -m jobs.NAME --help``: what the job does and its main keys, in well under 3 s."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.jobs.helpers import JOBS, ROOT, run_job

HEAVY = ("torch", "transformers", "ray", "pyarrow", "datasets", "plotly")


@pytest.mark.parametrize("name", JOBS)
def test_help_describes_the_job_and_its_main_keys_quickly(name):
    result, seconds = run_job(name, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"{name}: ")
    assert "Main keys:" in text and f"python -m jobs.{name} --cfg job" in text
    assert seconds < 3.0, f"--help took {seconds:.1f} s"
    section = text.split("Main keys:")[1].split("Every key with its current value")[0]
    keys = re.findall(r"(?<![\w.+])([a-z_]+(?:\.[a-z_]+)*)=", section)
    assert len(keys) >= 3
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name)
    for key in keys:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"--help of {name} names {key}, not in its config"


def test_help_imports_none_of_the_heavy_libraries():
    probe = "import runpy, sys; sys.argv = ['score', '--help']\n" \
            "try:\n    runpy.run_module('jobs.score', run_name='__main__')\nexcept SystemExit:\n    pass\n" \
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("name", JOBS)
def test_every_console_script_runs_from_any_directory(name, tmp_path):
    """``attribution-NAME`` as installed by ``pip install -e .``, started outside the repository."""
    script = Path(sys.executable).parent / f"attribution-{name}"
    assert script.is_file(), f"{script} is not installed: reinstall with pip install -c constraints.txt -e ."
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"{name}: "), result.stderr


def test_a_console_script_reports_a_user_error_from_another_directory(tmp_path):
    script = Path(sys.executable).parent / "attribution-report"
    result = subprocess.run([str(script), f"output_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"ERROR: output_dir={tmp_path}: no finished score run in {tmp_path}/runs; score one with "
        f"`python -m jobs.score output_dir={tmp_path}`, or set output_dir (or report.run_id)"]


# Two full jobs for one path rule: slow suite.
@pytest.mark.slow
def test_a_run_scored_with_a_relative_output_dir_is_reported_from_another_directory(tmp_path):
    """The run record keeps absolute paths, so the report finds the tables from anywhere."""
    from tests.jobs.helpers import overrides, tiny_inputs

    inputs = tiny_inputs(tmp_path / "inputs")
    (tmp_path / "work").mkdir()
    for name in ("fit_factors", "score"):
        result, _ = run_job(name, *overrides(inputs, "output_dir=run", job=name), cwd=tmp_path / "work")
        assert result.returncode == 0, result.stderr[-2000:]
    script = Path(sys.executable).parent / "attribution-report"
    result = subprocess.run([str(script), f"output_dir={tmp_path / 'work' / 'run'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "work" / "run" / "reports").is_dir()
