"""The metrics table: one row per method and damping, written as Parquet and printed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa

METRICS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("method", pa.string()),
        ("damping", pa.float64()),  # absolute lambda of the ground truth and of every method but the gradient dot product
        ("relative_damping", pa.float64()),  # lambda / (trace(G) / P)
        ("spearman", pa.float64()),
        ("pearson", pa.float64()),
        ("overhead_seconds", pa.float64()),
        ("pairwise_seconds", pa.float64()),
        ("mrr", pa.float64()),
        ("recall_at_k", pa.float64()),
        ("k", pa.int32()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class MetricsRow:
    method: str
    damping: float
    relative_damping: float
    spearman: float
    pearson: float
    overhead_seconds: float
    pairwise_seconds: float
    mrr: float
    recall_at_k: float
    k: int
    detail: str


def metrics_table(rows: Sequence[MetricsRow], run_id: str) -> pa.Table:
    columns = {name: [getattr(row, name) for row in rows] for name in asdict(rows[0])} if rows else {}
    return pa.Table.from_pydict({"run_id": [run_id] * len(rows), **columns}, schema=METRICS_SCHEMA)


def format_rows(rows: Sequence[MetricsRow]) -> str:
    """A fixed-width text table, as printed by the job and pasted in the README."""
    k = rows[0].k if rows else 10
    header = f"{'method':<16} {'damping':>9} {'Spearman':>8} {'Pearson':>8} {'overhead s':>10} {'pair-wise s':>11} {'MRR':>6} {f'R@{k}':>6}  detail"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.method:<16} {_number(row.damping, '.2e'):>9} {_number(row.spearman, '.3f'):>8} {_number(row.pearson, '.3f'):>8} "
            f"{_number(row.overhead_seconds, '.1f'):>10} {_number(row.pairwise_seconds, '.2e'):>11} "
            f"{_number(row.mrr, '.3f'):>6} {_number(row.recall_at_k, '.3f'):>6}  {row.detail}"
        )
    return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)
