"""Fit factors, score and report in one go: ``python -m jobs.pipeline`` runs the embedded demo (conf/pipeline.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from jobs.entry import job, say


@job("pipeline")
def main(cfg: DictConfig) -> None:
    from attribution.pipeline import run_pipeline
    from attribution.report import render_report
    from jobs.wiring import (
        cluster_settings,
        factor_settings,
        model_and_data,
        plain,
        prefilter_settings,
        prepare_process,
        query_settings,
        refine_settings,
        report_settings,
        score_settings,
    )

    prepare_process()
    model, data = model_and_data(cfg)
    report_options = report_settings(cfg)
    fit_line, score, summary = run_pipeline(
        model, data, factor_settings(cfg), query_settings(cfg), score_settings(cfg), cfg.output_dir, plain(cfg),
        show_top=cfg.show_top, progress=cfg.progress, prefilter=prefilter_settings(cfg), cluster=cluster_settings(cfg),
        refine=refine_settings(cfg, model, data), refit=cfg.refit,
    )
    say(summary)
    if fit_line is not None:
        say(fit_line)
    say(score.line())
    say(f"run record: {score.run_record}")
    report = render_report(score.run_record, report_options)
    say(f"report: {report.path}")


if __name__ == "__main__":
    main()
