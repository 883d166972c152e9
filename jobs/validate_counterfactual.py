"""Counterfactual validation (LDS, top-k removal and PBRF) on the demo or on natural text:
``python -m jobs.validate_counterfactual [benchmark=natural_text]`` (conf/validate_counterfactual.yaml)."""

from __future__ import annotations

from dataclasses import replace

from omegaconf import DictConfig

from jobs.entry import job, say


@job("validate_counterfactual")
def main(cfg: DictConfig) -> None:
    from attribution.counterfactual.benchmarks import prepare_benchmark
    from attribution.counterfactual.run import run_counterfactual
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import DataSettings, ModelSettings, QuerySettings, SettingsError, from_mapping
    from jobs.wiring import cluster_settings, plain, prepare_process, score_settings

    prepare_process()
    model = from_mapping(ModelSettings, plain(cfg.model), "model")
    data = from_mapping(DataSettings, plain(cfg.data), "data")
    queries = from_mapping(QuerySettings, plain(cfg.queries), "queries")
    if model.path is not None or data.path is not None:
        raise SettingsError("validate_counterfactual retrains the benchmark's own recipe on subsets of its corpus, so "
                            "model.path and data.path must stay null; change the benchmark with benchmark=demo|natural_text "
                            "and demo.* or natural_text.* (its corpus, model and training keys)")
    values = {key: plain(cfg)[key] for key in ("fit_sequences", "progress", "lds", "removal", "pbrf", "damping",
                                               "refine_steps", "methods", "finetune_stage", "retrain_batches")}
    settings = CounterfactualSettings.from_config(values)
    benchmark = prepare_benchmark(cfg.benchmark, plain(cfg.demo), plain(cfg.natural_text), settings.finetune_stage)
    model = replace(model, path=str(benchmark.model_dir))
    data = replace(data, path=str(benchmark.corpus_dir))
    if queries.path is None:
        queries = replace(queries, path=str(benchmark.queries_path))
    recipe = replace(benchmark.recipe, batches=settings.retrain_batches)
    summary = run_counterfactual(model, data, queries, score_settings(cfg), cluster_settings(cfg), recipe,
                                 settings, cfg.output_dir, plain(cfg), benchmark.finetune)
    say(summary.report())
    say(f"table: {summary.table_path}\nrun record: {summary.run_record}")


if __name__ == "__main__":
    main()
