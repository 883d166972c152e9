"""Fit EK-FAC factors: ``python -m jobs.fit_factors key=value ...`` (see conf/fit_factors.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from jobs.entry import job, say


@job("fit_factors")
def main(cfg: DictConfig) -> None:
    from attribution.fitting import run_fit
    from jobs.wiring import cluster_settings, factor_settings, model_and_data, plain, prepare_process

    prepare_process()
    model, data = model_and_data(cfg, stages="fit")
    summary = run_fit(model, data, factor_settings(cfg), cfg.output_dir, plain(cfg), cfg.progress, cluster_settings(cfg))
    say(summary.line())


if __name__ == "__main__":
    main()
