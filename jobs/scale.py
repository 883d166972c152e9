"""Every stage at real widths: ``python -m jobs.scale`` (see conf/scale.yaml and docs/scale.md)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("scale")
def main(cfg: DictConfig) -> None:
    from attribution.scale.benchmark import ScaleSettings, run_scale
    from jobs.wiring import plain, prepare_process

    prepare_process()
    values = plain(cfg.scale)
    settings = ScaleSettings(**{**values, "models": tuple(values["models"]), "projections": tuple(values["projections"])})
    run_scale(settings, Path(cfg.output_dir), say)


if __name__ == "__main__":
    main()
