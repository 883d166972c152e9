"""Counterfactual validation (LDS and PBRF) on the demo: ``python -m jobs.validate_counterfactual``
(conf/validate_counterfactual.yaml)."""

from __future__ import annotations

from dataclasses import replace

from omegaconf import DictConfig

from jobs.entry import job, say


@job("validate_counterfactual")
def main(cfg: DictConfig) -> None:
    from attribution.counterfactual.retrain import Recipe
    from attribution.counterfactual.run import run_counterfactual
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import DataSettings, ModelSettings, SettingsError, from_mapping
    from jobs.wiring import cluster_settings, demo_paths, plain, prepare_process, query_settings, score_settings

    prepare_process()
    model = from_mapping(ModelSettings, plain(cfg.model), "model")
    data = from_mapping(DataSettings, plain(cfg.data), "data")
    if model.path is not None or data.path is not None:
        raise SettingsError("validate_counterfactual retrains the demo's own recipe on subsets of the demo corpus, so "
                            "model.path and data.path must stay null; change the demo with demo.* (its corpus, model "
                            "and training keys)")
    values = {key: plain(cfg)[key] for key in ("fit_sequences", "progress", "lds", "pbrf", "damping", "refine_steps", "methods")}
    settings = CounterfactualSettings.from_config(values)
    demo = demo_paths(cfg)
    model = replace(model, path=str(demo.model_dir))
    data = replace(data, path=str(demo.corpus_dir))
    recipe = Recipe(plain(cfg.demo), str(demo.model_dir), str(demo.corpus_dir))
    summary = run_counterfactual(model, data, query_settings(cfg), score_settings(cfg), cluster_settings(cfg), recipe,
                                 settings, cfg.output_dir, plain(cfg))
    say(summary.report())
    say(f"table: {summary.table_path}\nrun record: {summary.run_record}")


if __name__ == "__main__":
    main()
