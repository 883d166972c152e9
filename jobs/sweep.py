"""Nightly sweep: ``python -m jobs.sweep key=value ...`` (see conf/sweep.yaml).

Scores the corpus shards not yet swept against the standing queries and merges them into
the kept top-k of ``output_dir``; a rerun of a finished night is a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from jobs.entry import job, say

if TYPE_CHECKING:
    from attribution.sweep import SweepSettings, SweepSummary


def sweep_settings(cfg: DictConfig) -> SweepSettings:
    from attribution.settings import from_mapping
    from attribution.sweep import SweepSettings
    from jobs.wiring import plain

    return from_mapping(SweepSettings, plain(cfg.sweep), "sweep")


def sweep(cfg: DictConfig) -> SweepSummary:
    """The job without Hydra's entry point, for tests and notebooks (``hydra.compose`` a config)."""
    from attribution.sweep import run_sweep
    from jobs.wiring import (
        cluster_settings,
        finetune_settings,
        model_and_data,
        plain,
        prefilter_settings,
        prepare_process,
        query_settings,
        refine_settings,
        score_settings,
        stored_factor_settings,
    )

    prepare_process()
    model, data = model_and_data(cfg)
    return run_sweep(
        model, data, stored_factor_settings(cfg), query_settings(cfg), score_settings(cfg), cfg.output_dir, plain(cfg),
        sweep_settings(cfg), finetune_settings(cfg), prefilter_settings(cfg), cluster_settings(cfg),
        refine_settings(cfg, model, data),
    )


@job("sweep")
def main(cfg: DictConfig) -> None:
    summary = sweep(cfg)
    for message in summary.messages:
        say(message)
    say(summary.line())
    if summary.run_record is not None:
        say(f"run record: {summary.run_record}")


if __name__ == "__main__":
    main()
