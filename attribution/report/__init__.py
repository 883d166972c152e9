"""What a user sees of a score run: the console summary and the HTML report."""

from attribution.report.page import Report, render_report
from attribution.report.run import find_score_run
from attribution.report.settings import ReportError, ReportSettings

__all__ = ["Report", "ReportError", "ReportSettings", "find_score_run", "render_report"]
