"""Fit EK-FAC factors: ``python -m jobs.fit_factors key=value ...`` (see conf/fit_factors.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.fitting import run_fit
from jobs.wiring import cluster_settings, factor_settings, limit_threads, model_and_data, plain


@hydra.main(config_path="../conf", config_name="fit_factors", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    model, data = model_and_data(cfg)
    summary = run_fit(model, data, factor_settings(cfg), cfg.output_dir, plain(cfg), cfg.progress, cluster_settings(cfg))
    print(summary.line())


if __name__ == "__main__":
    main()
