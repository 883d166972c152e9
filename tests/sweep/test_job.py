"""jobs.sweep wires conf/sweep.yaml to the library."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from attribution.settings import SettingsError
from jobs.sweep import sweep

CONF = Path(__file__).resolve().parents[2] / "conf"


def job_config(world, *extra: str):
    overrides = [f"model.path={world.model.path}", f"data.path={world.data.path}", f"queries.path={world.queries.path}",
                 "factors.strategy=identity", "model.device=cpu", "data.max_length=16", "score.top_k=3",
                 "cluster.num_workers=0", f"output_dir={world.output}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sweep", overrides=overrides)


def test_the_job_sweeps_with_hydra_overrides(world):
    world.arrive(0)
    summary = sweep(job_config(world, "sweep.date=2025-01-01"))
    assert summary.sweep_date == "2025-01-01" and summary.current_rows > 0
    assert (world.output / "scores" / "sweep_date=2025-01-01").is_dir()
    assert sweep(job_config(world, "sweep.date=2025-01-01")).noop


def test_bad_sweep_settings_fail_loudly(world):
    with pytest.raises(ConfigCompositionException):
        job_config(world, "sweep.dat=2025-01-01")
    with pytest.raises(SettingsError, match="sweep.date"):
        sweep(job_config(world, "sweep.date=2025-13-01"))
    with pytest.raises(SettingsError, match="allow_failed_shards"):
        sweep(job_config(world, "cluster.allow_failed_shards=true"))
