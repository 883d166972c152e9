"""Validate influence scores against an exact ground truth: ``python -m jobs.evaluate`` (see conf/evaluate.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from jobs.entry import job, say


@job("evaluate")
def main(cfg: DictConfig) -> None:
    from dataclasses import replace

    from attribution.evaluation.config import EvaluationSettings
    from attribution.evaluation.run import run_evaluate
    from jobs.wiring import demo_paths, model_and_data, plain, prepare_process, query_settings

    prepare_process()
    model, data = model_and_data(cfg)
    values = plain(cfg.evaluate)
    queries = query_settings(cfg)
    if values.get("stages") == "multi" and cfg.model.path is None:
        # The demo's fine-tuned model, its question-answer rows, and its held-out questions.
        demo = demo_paths(cfg)
        values["finetune_model_path"] = values.get("finetune_model_path") or str(demo.finetuned_model_dir)
        values["finetune_data_path"] = values.get("finetune_data_path") or str(demo.finetune_path)
        if cfg.queries.path is None:
            queries = replace(queries, path=str(demo.finetune_queries_path))
    settings = EvaluationSettings.from_config(values)
    summary = run_evaluate(model, data, queries, settings, cfg.output_dir, plain(cfg))
    say(summary.report())
    say(f"metrics: {summary.metrics_path}\nrun record: {summary.run_record}")


if __name__ == "__main__":
    main()
