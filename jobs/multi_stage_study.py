"""Multi-stage fact-tracing study on the demo: ``python -m jobs.multi_stage_study`` (conf/multi_stage_study.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("multi_stage_study")
def main(cfg: DictConfig) -> None:
    from attribution.runs import write_json_atomically
    from attribution.studies.multi_stage import format_table, run_study
    from jobs.wiring import demo_paths, prepare_process

    prepare_process()
    output_dir = Path(cfg.output_dir)
    rows = run_study(demo_paths(cfg), list(cfg.study.dampings), output_dir, cfg.study.rank, cfg.study.device)
    say(format_table(rows))
    write_json_atomically(output_dir / "multi_stage_study.json", [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
