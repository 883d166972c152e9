"""Nightly sweep: ``python -m jobs.sweep key=value ...`` (see conf/sweep.yaml).

Scores the corpus shards not yet swept against the standing queries and merges them into
the kept top-k of ``output_dir``; a rerun of a finished night is a no-op.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.settings import from_mapping
from attribution.sweep import SweepSettings, SweepSummary, run_sweep
from jobs.wiring import (
    cluster_settings,
    factor_settings,
    finetune_settings,
    limit_threads,
    model_and_data,
    plain,
    prefilter_settings,
    query_settings,
    score_settings,
)


def sweep_settings(cfg: DictConfig) -> SweepSettings:
    return from_mapping(SweepSettings, plain(cfg.sweep), "sweep")


def sweep(cfg: DictConfig) -> SweepSummary:
    """The job without Hydra's entry point, for tests and notebooks (``hydra.compose`` a config)."""
    limit_threads()
    model, data = model_and_data(cfg)
    return run_sweep(
        model, data, factor_settings(cfg), query_settings(cfg), score_settings(cfg), cfg.output_dir, plain(cfg),
        sweep_settings(cfg), finetune_settings(cfg), prefilter_settings(cfg), cluster_settings(cfg),
    )


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = sweep(cfg)
    for message in summary.messages:
        print(message)
    print(summary.line())
    if summary.run_record is not None:
        print(f"run record: {summary.run_record}")


if __name__ == "__main__":
    main()
