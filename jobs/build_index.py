"""Build or extend a prefilter index: ``python -m jobs.build_index key=value ...`` (see conf/build_index.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from attribution.prefilter.index import run_build_index
from jobs.wiring import limit_threads, model_and_data, plain, prefilter_settings


@hydra.main(config_path="../conf", config_name="build_index", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    _, data = model_and_data(cfg)
    print(run_build_index(prefilter_settings(cfg), data, cfg.output_dir, plain(cfg)).line())


if __name__ == "__main__":
    main()
