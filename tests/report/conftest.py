"""A report of the demo model's own text, shared by the page and browser tests."""

from __future__ import annotations

import pytest

from attribution.report import Report, ReportSettings, render_report
from tests.report.helpers import make_demo_run


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory) -> Report:
    record_path = make_demo_run(tmp_path_factory.mktemp("demo-report"))
    return render_report(record_path, ReportSettings(documents=10))
