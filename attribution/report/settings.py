"""What the HTML report shows; built from ``conf/report/default.yaml`` by the jobs."""

from __future__ import annotations

from dataclasses import dataclass

from attribution.errors import UserError


class ReportError(UserError, ValueError):
    """A score run that cannot be found or read for a report."""


@dataclass(frozen=True)
class ReportSettings:
    # The score run (its run_id); null = the latest one in output_dir/runs.
    run_id: str | None = None
    # The HTML file to write; null = <the run's output_dir>/reports/<run_id>.html.
    path: str | None = None
    # Top (and bottom) documents per query shown with their text, token colours and layers.
    documents: int = 10
    # Queries per page of the index.
    page_size: int = 50
    # The queries file; null = the one the run scored.
    queries_path: str | None = None

    def __post_init__(self) -> None:
        for key in ("documents", "page_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ReportError(f"report.{key}={value!r}: expected a whole number >= 1")
