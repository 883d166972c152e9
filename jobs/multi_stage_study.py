"""Multi-stage fact-tracing study on the demo: ``python -m jobs.multi_stage_study`` (conf/multi_stage_study.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attribution.runs import write_json_atomically
from attribution.studies.multi_stage import format_table, run_study
from jobs.wiring import demo_paths, limit_threads


@hydra.main(config_path="../conf", config_name="multi_stage_study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    output_dir = Path(cfg.output_dir)
    rows = run_study(demo_paths(cfg), list(cfg.study.dampings), output_dir, cfg.study.rank, cfg.study.device)
    print(format_table(rows))
    write_json_atomically(output_dir / "multi_stage_study.json", [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
