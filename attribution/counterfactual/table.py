"""The counterfactual table: one row per method, damping and step budget, written as Parquet and printed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("method", pa.string()),
        ("kind", pa.string()),
        ("damping", pa.string()),  # "10x" (of the mean eigenvalue), "default" (0.1 x each module's mean) or "-"
        ("absolute_damping", pa.float64()),
        ("steps", pa.int32()),  # refined methods: Gauss-Newton products per query at most
        ("lds", pa.float64()),
        ("lds_low", pa.float64()),
        ("lds_high", pa.float64()),
        ("queries", pa.int32()),  # queries with a rank correlation (the others are constant)
        ("pbrf_pearson", pa.float64()),
        ("pbrf_spearman", pa.float64()),
        ("pbrf_relative_error", pa.float64()),
        ("seconds", pa.float64()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class Row:
    method: str
    kind: str
    damping: str
    absolute_damping: float
    steps: int | None
    lds: float
    lds_low: float
    lds_high: float
    queries: int
    pbrf_pearson: float
    pbrf_spearman: float
    pbrf_relative_error: float
    seconds: float
    detail: str


def table(rows: Sequence[Row], run_id: str) -> pa.Table:
    columns = {f.name: [getattr(row, f.name) for row in rows] for f in fields(Row)}
    return pa.Table.from_pydict({"run_id": [run_id] * len(rows), **columns}, schema=SCHEMA)


def format_rows(rows: Sequence[Row], confidence: float) -> str:
    """A Markdown table, as printed by the job and pasted into docs/validation.md."""
    level = f"{round(100 * confidence)}% CI"
    lines = [f"| method | damping | steps | LDS | {level} | PBRF Pearson | PBRF Spearman | PBRF rel. error | seconds | detail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        interval = "-" if math.isnan(row.lds_low) else f"[{row.lds_low:.3f}, {row.lds_high:.3f}]"
        lines.append(f"| {row.method} | {row.damping} | {'-' if row.steps is None else row.steps} | {_number(row.lds, '.3f')} | "
                     f"{interval} | {_number(row.pbrf_pearson, '.3f')} | {_number(row.pbrf_spearman, '.3f')} | "
                     f"{_number(row.pbrf_relative_error, '.3f')} | {_number(row.seconds, '.1f')} | {row.detail} |")
    return "\n".join(lines)


def as_dicts(rows: Sequence[Row]) -> list[dict]:
    return [asdict(row) for row in rows]


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)
