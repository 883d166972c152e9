"""Fit and score throughput over Ray worker counts: ``python -m jobs.worker_scaling`` (conf/worker_scaling.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("worker_scaling")
def main(cfg: DictConfig) -> None:
    from attribution.runs import write_json_atomically
    from attribution.studies.worker_scaling import format_table, run_scaling
    from jobs.wiring import factor_settings, model_and_data, plain, prepare_process, query_settings, score_settings

    prepare_process()
    model, data = model_and_data(cfg)
    output_dir = Path(cfg.output_dir)
    rows = run_scaling(model, data, query_settings(cfg), score_settings(cfg), factor_settings(cfg),
                       plain(cfg.scaling)["workers"], output_dir)
    say(format_table(rows))
    write_json_atomically(output_dir / "worker_scaling.json", [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
