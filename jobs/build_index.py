"""Build or extend a prefilter index: ``python -m jobs.build_index key=value ...`` (see conf/build_index.yaml)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("build_index")
def main(cfg: DictConfig) -> None:
    from attribution.prefilter.index import run_build_index
    from jobs.wiring import factor_settings, model_and_data, plain, prefilter_settings, prepare_process

    prepare_process()
    model, data = model_and_data(cfg)
    store = Path(factor_settings(cfg).path or Path(cfg.output_dir) / "factors")
    say(run_build_index(prefilter_settings(cfg), data, cfg.output_dir, plain(cfg), model, store).line())


if __name__ == "__main__":
    main()
