"""Recall and cost of the gradient prefilter: ``python -m jobs.sketch_benchmark`` (see conf/sketch_benchmark.yaml)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("sketch_benchmark")
def main(cfg: DictConfig) -> None:
    from attribution.studies.sketch_recall import SketchRecallSettings, format_results, run_sketch_recall
    from jobs.wiring import demo_paths, plain, prepare_process

    prepare_process()
    values = plain(cfg.sketch_benchmark)
    lists = {key: tuple(values[key]) for key in ("sketch_dims", "fractions", "cost_fractions")}
    lists["compressed"] = tuple(tuple(pair) for pair in values["compressed"])
    settings = SketchRecallSettings(**{**values, **lists})
    results = run_sketch_recall(settings, demo_paths(cfg), Path(cfg.output_dir), say)
    say(format_results(results, settings))


if __name__ == "__main__":
    main()
