"""What a user sees of a score run: the console summary and the HTML report.

The names below are imported on first use: a job checks ``report.*`` settings before it starts,
and that must not load the page's dependencies (torch among them).
"""

from importlib import import_module
from typing import Any

_HOMES = {"Report": "page", "render_report": "page", "find_score_run": "run",
          "ReportError": "settings", "ReportSettings": "settings"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
