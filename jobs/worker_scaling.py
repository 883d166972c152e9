"""Fit and score throughput over Ray worker counts: ``python -m jobs.worker_scaling`` (conf/worker_scaling.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attribution.runs import write_json_atomically
from attribution.studies.worker_scaling import format_table, run_scaling
from jobs.wiring import factor_settings, limit_threads, model_and_data, plain, query_settings, score_settings


@hydra.main(config_path="../conf", config_name="worker_scaling", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    model, data = model_and_data(cfg)
    output_dir = Path(cfg.output_dir)
    rows = run_scaling(model, data, query_settings(cfg), score_settings(cfg), factor_settings(cfg),
                       plain(cfg.scaling)["workers"], output_dir)
    print(format_table(rows))
    write_json_atomically(output_dir / "worker_scaling.json", [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
