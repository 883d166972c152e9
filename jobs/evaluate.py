"""Validate influence scores against an exact ground truth: ``python -m jobs.evaluate`` (see conf/evaluate.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.evaluation.config import EvaluationSettings
from attribution.evaluation.run import run_evaluate
from jobs.wiring import limit_threads, model_and_data, plain, query_settings


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    model, data = model_and_data(cfg)
    settings = EvaluationSettings.from_config(plain(cfg.evaluate))
    summary = run_evaluate(model, data, query_settings(cfg), settings, cfg.output_dir, plain(cfg))
    print(summary.report())
    print(f"metrics: {summary.metrics_path}\nrun record: {summary.run_record}")


if __name__ == "__main__":
    main()
