"""Queries: a prompt and the completion whose log-probability is explained."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attribution.data.bad_input import EMPTY_SHARD, ERROR, BadRows, Skip, SkipHandler
from attribution.data.corpus import (
    IdRegistry,
    empty_text_reason,
    list_shards,
    string_problem,
)
from attribution.data.formats import Row, read_rows

QUERY_COLUMNS = ("id", "prompt", "completion")
SOURCE_IDS_COLUMN = "source_ids"


@dataclass(frozen=True)
class Query:
    """One query; ``source_ids`` are known source documents, for evaluation."""

    id: str
    prompt: str
    completion: str
    source_ids: tuple[str, ...] = ()
    # Where it was read from, so a query skipped later (too long, non-finite) names its file and row.
    file: str = field(default="", compare=False)
    row: int | None = field(default=None, compare=False)


def read_queries(path: str | Path, on_skip: SkipHandler, on_bad_row: str = ERROR) -> list[Query]:
    """Read every query from a file, folder or glob of any corpus form (JSON Lines, Parquet, ...).

    Columns ``id``, ``prompt`` and ``completion`` are required, ``source_ids`` (a list of
    strings) is optional. An empty prompt is allowed (the completion is then unconditional)
    but a null one is a bad row, as are non-string values (DataError, or a skip with
    ``on_bad_row="skip"``); duplicate ids are errors. A null, empty or whitespace-only
    completion has nothing to measure: it goes to ``on_skip``.
    """
    seen = IdRegistry()
    bad = BadRows(on_bad_row, on_skip)
    queries = []
    for file in list_shards(path):
        bad.start_shard()
        rows = 0
        for row in read_rows(file, QUERY_COLUMNS, optional=(SOURCE_IDS_COLUMN,)):
            rows += 1
            query = _query(row, file, seen, bad, on_skip)
            if query is not None:
                queries.append(query)
        if rows == 0:
            on_skip(Skip(None, str(file), None, EMPTY_SHARD))
        bad.check_shard(file, rows)
    return queries


def _query(row: Row, file: Path, seen: IdRegistry, bad: BadRows, on_skip: SkipHandler) -> Query | None:
    if row.values is None:
        bad(file, row.index, row.line, str(row.problem))
        return None
    record = row.values
    problem = string_problem(record["id"], "id", nullable=False)
    if problem is not None:
        bad(file, row.index, row.line, problem)
        return None
    query_id = record["id"]
    seen.add(query_id, file, row.index)
    problem = (
        string_problem(record["prompt"], "prompt", nullable=False)
        or string_problem(record["completion"], "completion", nullable=True)
        or _source_ids_problem(record[SOURCE_IDS_COLUMN])
    )
    if record["prompt"] is None:
        problem = "column 'prompt' is null; use an empty string for an unconditional completion"
    if problem is not None:
        bad(file, row.index, row.line, problem, query_id)
        return None
    reason = empty_text_reason(record["completion"], "completion")
    if reason is not None:
        on_skip(Skip(query_id, str(file), row.index, reason))
        return None
    return Query(query_id, record["prompt"], record["completion"], tuple(record[SOURCE_IDS_COLUMN] or ()),
                 str(file), row.index)


def _source_ids_problem(value: Any) -> str | None:
    """The optional ground-truth ids: null means none; else a list of strings."""
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return f"column {SOURCE_IDS_COLUMN!r} must be a list of strings, got {value!r:.80}"
