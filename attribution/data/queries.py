"""Queries: a prompt and the completion whose log-probability is explained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.data.corpus import (
    DataError,
    IdRegistry,
    Skip,
    SkipHandler,
    empty_text_reason,
    iter_rows,
    list_shards,
    require_id,
    require_optional_string,
)

QUERY_COLUMNS = ("id", "prompt", "completion")
SOURCE_IDS_COLUMN = "source_ids"


@dataclass(frozen=True)
class Query:
    """One query; ``source_ids`` are known source documents, for evaluation."""

    id: str
    prompt: str
    completion: str
    source_ids: tuple[str, ...] = ()


def read_queries(path: str | Path, on_skip: SkipHandler) -> list[Query]:
    """Read every query from a JSON Lines or Parquet file (or dir / glob).

    Columns ``id``, ``prompt`` and ``completion`` are required, ``source_ids``
    (a list of strings) is optional. An empty prompt is allowed (the
    completion is then unconditional) but a null one is an error, as are
    missing columns, non-string values and duplicate ids. A null, empty or
    whitespace-only completion has nothing to measure: it goes to ``on_skip``.
    """
    seen = IdRegistry()
    queries = []
    for file in list_shards(path):
        for row, record in iter_rows(file, QUERY_COLUMNS, optional=(SOURCE_IDS_COLUMN,)):
            query_id = require_id(record["id"], file, row, "id")
            seen.add(query_id, file, row)
            prompt = require_optional_string(record["prompt"], file, row, "prompt")
            if prompt is None:
                raise DataError(
                    f"{file} row {row}: column 'prompt' is null; "
                    "use an empty string for an unconditional completion"
                )
            completion = require_optional_string(record["completion"], file, row, "completion")
            reason = empty_text_reason(completion, "completion")
            if reason is not None:
                on_skip(Skip(query_id, str(file), row, reason))
                continue
            source_ids = _source_ids(record[SOURCE_IDS_COLUMN], file, row)
            queries.append(Query(query_id, prompt, completion, source_ids))
    return queries


def _source_ids(value: Any, path: Path, row: int) -> tuple[str, ...]:
    """The optional ground-truth ids: null means none; else a list of strings."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(
            f"{path} row {row}: column {SOURCE_IDS_COLUMN!r} must be a list of "
            f"strings, got {value!r:.80}"
        )
    return tuple(value)
