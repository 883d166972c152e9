"""Query-side cost of influence scoring: ``python -m jobs.query_benchmark`` (see conf/query_benchmark.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("query_benchmark")
def main(cfg: DictConfig) -> None:
    from attribution.runs import write_json_atomically
    from attribution.settings import resolve_device
    from attribution.studies.query_side import QuerySideSettings, format_rows, run_query_side
    from jobs.wiring import plain, prepare_process

    prepare_process()
    settings = QuerySideSettings(**plain(cfg.query_benchmark))
    rows = run_query_side(settings, resolve_device(settings.device))
    say(format_rows(rows))
    write_json_atomically(Path(cfg.output_dir) / "query_benchmark.json",
                          [{**asdict(row), "seconds_per_query": row.seconds_per_query} for row in rows])


if __name__ == "__main__":
    main()
