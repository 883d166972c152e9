"""Score queries against a corpus: ``python -m jobs.score key=value ...`` (see conf/score.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from jobs.entry import job, say


@job("score")
def main(cfg: DictConfig) -> None:
    from attribution.scoring.run import run_score
    from jobs.wiring import (
        built_prefilter_settings,
        cluster_settings,
        finetune_settings,
        model_and_data,
        plain,
        prepare_process,
        query_settings,
        refine_settings,
        score_settings,
        stored_factor_settings,
    )

    prepare_process()
    model, data = model_and_data(cfg, stages="score")
    queries, score, cluster = query_settings(cfg), score_settings(cfg), cluster_settings(cfg)
    refine = refine_settings(cfg, model, data)
    # Then what earlier jobs must have written: the stores and the prefilter index.
    factors, finetune, prefilter = stored_factor_settings(cfg), finetune_settings(cfg), built_prefilter_settings(cfg)
    summary = run_score(model, data, factors, queries, score, cfg.output_dir, plain(cfg), finetune, prefilter, cluster,
                        refine_settings=refine)
    say(summary.line())
    say(f"run record: {summary.run_record}")


if __name__ == "__main__":
    main()
