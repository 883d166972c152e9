"""Score queries against a corpus: ``python -m jobs.score key=value ...`` (see conf/score.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.scoring.run import run_score
from jobs.wiring import (
    cluster_settings,
    factor_settings,
    finetune_settings,
    limit_threads,
    model_and_data,
    plain,
    prefilter_settings,
    query_settings,
    refine_settings,
    score_settings,
)


@hydra.main(config_path="../conf", config_name="score", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    model, data = model_and_data(cfg)
    summary = run_score(
        model, data, factor_settings(cfg), query_settings(cfg), score_settings(cfg), cfg.output_dir, plain(cfg),
        finetune_settings(cfg), prefilter_settings(cfg), cluster_settings(cfg), refine_settings=refine_settings(cfg),
    )
    print(summary.line())


if __name__ == "__main__":
    main()
