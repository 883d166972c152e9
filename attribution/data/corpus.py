"""Corpus documents: streamed from their shards and validated row by row.

A corpus is a set of shard files (:func:`list_shards`: a file, a folder or a glob of Parquet,
Arrow, JSON Lines or JSON files, plain or compressed, or a ``save_to_disk`` folder), read by
:func:`attribution.data.formats.read_rows` so memory does not grow with a shard. Bad input
either raises :class:`DataError`, whose message names the file, row and line, or is reported
to the caller as a :class:`Skip`; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.data.bad_input import (
    EMPTY_SHARD,
    ERROR,
    BadRows,
    DataError,
    Skip,
    SkipHandler,
)
from attribution.data.discovery import list_shards
from attribution.data.formats import Row, read_rows

__all__ = [
    "DataError",
    "Document",
    "IdRegistry",
    "Skip",
    "SkipHandler",
    "empty_text_reason",
    "iter_documents",
    "list_shards",
    "string_problem",
]


@dataclass(frozen=True)
class Document:
    """One corpus document; `shard` is its file, `row` its 0-based row there."""

    id: str
    text: str
    shard: str
    row: int


def iter_documents(
    shards: Sequence[str | Path],
    id_field: str = "id",
    text_field: str = "text",
    *,
    on_skip: SkipHandler,
    on_bad_row: str = ERROR,
    batch_rows: int = 1024,
) -> Iterator[Document]:
    """Stream the documents of ``shards`` in order, validating every row.

    A bad row (unreadable, a null or non-string id, a non-string text) raises DataError
    (``on_bad_row="error"``) or is passed to ``on_skip`` (``"skip"``); a shard whose every row
    is bad is an error either way. Raises DataError for an unreadable file, a column missing
    from a Parquet or Arrow schema, and an id seen before in any of these shards (naming both
    places). Null, empty and whitespace-only texts, and empty shards, are passed to
    ``on_skip``; it is required so that every caller decides where skips are recorded.

    Duplicate detection keeps every id seen so far in memory (the ids, not the texts), so it
    covers exactly the shards of one call.
    """
    seen = IdRegistry()
    bad = BadRows(on_bad_row, on_skip)
    for shard in shards:
        path = Path(shard)
        bad.start_shard()
        rows = 0
        for row in read_rows(path, (id_field, text_field), batch_rows=batch_rows):
            rows += 1
            document = _document(row, path, id_field, text_field, seen, bad, on_skip)
            if document is not None:
                yield document
        if rows == 0:
            on_skip(Skip(None, str(path), None, EMPTY_SHARD))
        bad.check_shard(path, rows)


def _document(
    row: Row, path: Path, id_field: str, text_field: str, seen: IdRegistry, bad: BadRows, on_skip: SkipHandler
) -> Document | None:
    if row.values is None:
        bad(path, row.index, row.line, str(row.problem))
        return None
    doc_id = row.values[id_field]
    problem = string_problem(doc_id, id_field, nullable=False)
    if problem is not None:
        bad(path, row.index, row.line, problem)
        return None
    seen.add(doc_id, path, row.index)
    text = row.values[text_field]
    problem = string_problem(text, text_field, nullable=True)
    if problem is not None:
        bad(path, row.index, row.line, problem, doc_id)
        return None
    reason = empty_text_reason(text, text_field)
    if reason is not None:
        on_skip(Skip(doc_id, str(path), row.index, reason))
        return None
    return Document(doc_id, text, str(path), row.index)


def string_problem(value: Any, field: str, nullable: bool) -> str | None:
    """Why ``value`` is not a usable string column value (None: it is)."""
    if value is None:
        return None if nullable else f"column {field!r} is null"
    if not isinstance(value, str):
        return f"column {field!r} must be a string, got {type(value).__name__} {value!r:.60}"
    return None


def empty_text_reason(text: str | None, field: str) -> str | None:
    """Why ``text`` cannot be used (null, empty, whitespace only), or None."""
    if text is None:
        return f"null {field}"
    if not text.strip():
        return f"empty {field}" if not text else f"whitespace-only {field}"
    return None


class IdRegistry:
    """Ids seen so far, with where each was first seen, to report duplicates.

    Ids are compared as strings, exactly (no stripping or case folding).
    """

    def __init__(self) -> None:
        # Shard paths are stored once and referenced by index: the per-id cost
        # matters when a call covers millions of documents.
        self._shards: list[Path] = []
        self._first: dict[str, tuple[int, int]] = {}

    def add(self, item_id: str, shard: Path, row: int) -> None:
        """Record ``item_id`` at ``shard``/``row``; DataError if seen before."""
        if not self._shards or self._shards[-1] != shard:
            self._shards.append(shard)
        previous = self._first.setdefault(item_id, (len(self._shards) - 1, row))
        if previous != (len(self._shards) - 1, row):
            first_shard, first_row = self._shards[previous[0]], previous[1]
            raise DataError(
                f"duplicate id {item_id!r}: {shard} row {row} repeats "
                f"{first_shard} row {first_row}"
            )
