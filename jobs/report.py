"""Render a score run as one self-contained HTML report: ``python -m jobs.report`` (see conf/report.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from jobs.entry import job, say


@job("report")
def main(cfg: DictConfig) -> None:
    from attribution.report import find_score_run, render_report
    from jobs.wiring import report_settings

    settings = report_settings(cfg)
    report = render_report(find_score_run(cfg.output_dir, settings.run_id), settings)
    say(report.line())


if __name__ == "__main__":
    main()
