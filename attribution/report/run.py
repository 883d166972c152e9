"""A finished score run as the report reads it: its record, its score and token tables, its queries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attribution.data.corpus import DataError
from attribution.data.queries import Query, read_queries
from attribution.report.settings import ReportError

RUNS_DIR = "runs"


@dataclass(frozen=True)
class Row:
    """One kept row of the score table (SPEC "Score table")."""

    query_id: str
    direction: str
    rank: int
    doc_id: str
    score: float
    layer_scores: np.ndarray
    shard: str


@dataclass
class ScoreRun:
    run_id: str
    record_path: Path
    record: dict[str, Any]
    method: str
    modules: list[str]
    queries: list[Query]
    positive: dict[str, list[Row]]
    negative: dict[str, list[Row]]
    # (query_id, doc_id) -> (tokens, token scores), for the rows the report shows.
    tokens: dict[tuple[str, str], tuple[list[str], np.ndarray]] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        """The run directory the record sits in (``<output_dir>/runs/<run_id>.json``)."""
        return self.record_path.parent.parent

    @property
    def settings(self) -> dict[str, Any]:
        return self.record.get("config", {}).get("resolved_settings", {})

    @property
    def counts(self) -> dict[str, int]:
        return self.record.get("counts", {})


def find_score_run(output_dir: str | Path, run_id: str | None = None) -> Path:
    """The record of score run ``run_id`` in ``output_dir``, or of its latest score run."""
    runs = Path(output_dir) / RUNS_DIR
    if run_id is not None:
        path = runs / f"{run_id}.json"
        if not path.is_file():
            raise ReportError(f"report.run_id={run_id}: no run record {path}")
        return path
    finished = []
    for path in runs.glob("*.json") if runs.is_dir() else ():
        record = _read_record(path)
        if record.get("job") == "score" and "scores" in record.get("outputs", {}):
            finished.append((record.get("started", ""), record.get("run_id", ""), path))
    if not finished:
        raise ReportError(
            f"output_dir={output_dir}: no finished score run in {runs}; score one with "
            f"`python -m jobs.score output_dir={output_dir}`, or set output_dir (or report.run_id)"
        )
    return max(finished)[2]


def load_score_run(record_path: str | Path, documents: int, queries_path: str | None = None) -> ScoreRun:
    """Read a score run; token scores only for the first ``documents`` rows of each query."""
    record_path = Path(record_path)
    record = _read_record(record_path)
    outputs = record.get("outputs", {})
    if "scores" not in outputs:
        raise ReportError(f"run record {record_path} names no score table (a score.top_k=all run writes only pairs, "
                          f"which have no ranking to report)")
    scores_path = Path(outputs["scores"])
    if not scores_path.exists():
        raise ReportError(f"run record {record_path}: its score table {scores_path} does not exist")
    table = _read_table(scores_path, record["run_id"])
    positive, negative = _rows(table)
    methods = set(table.column("method").to_pylist())
    method = methods.pop() if len(methods) == 1 else "+".join(sorted(methods)) or "unknown"
    config = record.get("config", {})
    queries_file = queries_path or config.get("resolved_settings", {}).get("queries", {}).get("path")
    if queries_file is None:
        raise ReportError(f"run record {record_path} names no queries file; set report.queries_path")
    try:
        queries = read_queries(queries_file, on_skip=lambda skip: None)
    except (DataError, OSError) as error:
        raise ReportError(f"queries of run {record['run_id']} ({queries_file}): {error}; set report.queries_path") from error
    run = ScoreRun(record["run_id"], record_path, record, method, list(config.get("modules", [])), queries, positive, negative)
    token_path = record.get("outputs", {}).get("token_scores")
    if token_path is not None and Path(token_path).exists():
        wanted = {(row.query_id, row.doc_id) for rows in positive.values() for row in rows[:documents]}
        run.tokens = _token_scores(Path(token_path), record["run_id"], wanted)
    return run


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"run record {path} cannot be read: {error}") from error


def _read_table(path: Path, run_id: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One run's rows of a table written as one Parquet file or as a dataset directory."""
    try:
        return pq.read_table(path, columns=columns, filters=[("run_id", "=", run_id)])
    except (OSError, pa.ArrowInvalid) as error:
        raise ReportError(f"table {path} cannot be read: {error}") from error


def _rows(table: pa.Table) -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
    positive: dict[str, list[Row]] = {}
    negative: dict[str, list[Row]] = {}
    columns = {name: table.column(name).to_pylist() for name in ("query_id", "direction", "rank", "doc_id", "score", "shard")}
    layers = table.column("layer_scores").to_pylist()
    for i in range(table.num_rows):
        row = Row(columns["query_id"][i], columns["direction"][i], columns["rank"][i], columns["doc_id"][i],
                  columns["score"][i], np.asarray(layers[i] or [], dtype=np.float32), columns["shard"][i])
        (positive if row.direction == "positive" else negative).setdefault(row.query_id, []).append(row)
    for rows in (*positive.values(), *negative.values()):
        rows.sort(key=lambda r: r.rank)
    return positive, negative


def _token_scores(path: Path, run_id: str, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[list[str], np.ndarray]]:
    """The token rows of ``wanted`` (query, document) pairs, filtered in Arrow before any Python list is built."""
    table = _read_table(path, run_id, ["query_id", "doc_id", "tokens", "token_scores"])
    separator = "\x1f"
    keys = pc.binary_join_element_wise(table.column("query_id"), table.column("doc_id"), separator)
    table = table.filter(pc.is_in(keys, value_set=pa.array([f"{q}{separator}{d}" for q, d in wanted], pa.string())))
    return {
        (query_id, doc_id): (tokens, np.asarray(scores, dtype=np.float32))
        for query_id, doc_id, tokens, scores in zip(*(table.column(c).to_pylist() for c in table.column_names))
    }
