"""Fit factors and score in one go: ``python -m jobs.pipeline`` runs the embedded demo (conf/pipeline.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.pipeline import run_pipeline
from jobs.wiring import (
    cluster_settings,
    factor_settings,
    limit_threads,
    model_and_data,
    plain,
    prefilter_settings,
    query_settings,
    refine_settings,
    score_settings,
)


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    model, data = model_and_data(cfg)
    fit, score, report = run_pipeline(
        model, data, factor_settings(cfg), query_settings(cfg), score_settings(cfg), cfg.output_dir, plain(cfg),
        show_top=cfg.show_top, progress=cfg.progress, prefilter=prefilter_settings(cfg), cluster=cluster_settings(cfg),
        refine=refine_settings(cfg),
    )
    print(report)
    if fit is not None:
        print(fit.line())
    print(score.line())
    print(f"run record: {score.run_record}")


if __name__ == "__main__":
    main()
