"""Corpus shards: finding them, streaming their rows, validating documents.

A corpus is a set of Parquet or JSON Lines files; one file is one shard. Rows
are streamed (Parquet by record batch, JSON Lines by line), so memory does not
grow with the size of a shard. Bad input either raises :class:`DataError`,
whose message names the file (and row and column where relevant), or is
reported to the caller as a :class:`Skip`; nothing is dropped silently.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attribution.errors import UserError

PARQUET_SUFFIXES = frozenset({".parquet"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
SUPPORTED_SUFFIXES = PARQUET_SUFFIXES | JSONL_SUFFIXES
_GLOB_CHARS = frozenset("*?[")


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Document:
    """One corpus document; `shard` is its file, `row` its 0-based row there."""

    id: str
    text: str
    shard: str
    row: int


@dataclass(frozen=True)
class Skip:
    """An input item that was left out, and why (it goes into run records)."""

    item_id: str | None
    shard: str
    row: int | None
    reason: str


SkipHandler = Callable[[Skip], None]


def list_shards(path: str | Path) -> list[Path]:
    """Resolve a file, a directory or a glob to a sorted list of shard files.

    A directory contributes every ``*.parquet``, ``*.jsonl`` and ``*.json``
    file below it, recursively; other files and hidden entries (names starting
    with ``.``, e.g. half-written temporaries) are ignored there. A file named
    explicitly, or matched by a glob, must have one of those extensions.
    """
    text = str(path)
    path = Path(path)
    if path.is_dir():
        files = [f for f in path.rglob("*") if _is_visible_shard(f, path)]
        if not files:
            raise DataError(f"{path}: directory contains no {_suffix_list()} files")
        return sorted(files)
    if path.is_file():
        files = [path]
    elif _GLOB_CHARS & set(text):
        files = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        if not files:
            raise DataError(f"{text}: glob matches no files")
    else:
        raise DataError(f"{path}: no such file or directory")
    for file in files:
        if file.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{file}: unsupported file type; expected {_suffix_list()}")
    return sorted(files)


def iter_rows(
    path: Path,
    columns: Sequence[str],
    optional: Sequence[str] = (),
    batch_rows: int = 1024,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(row, {column: value})`` from one Parquet or JSON Lines file.

    ``columns`` must exist (else :class:`DataError` naming the column and the
    columns that do exist); ``optional`` columns read as None when absent.
    Values are plain Python objects, checked by the caller.
    """
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _iter_parquet_rows(path, columns, optional, batch_rows)
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _iter_jsonl_rows(path, columns, optional)
    raise DataError(f"{path}: unsupported file type; expected {_suffix_list()}")


def iter_documents(
    shards: Sequence[str | Path],
    id_field: str = "id",
    text_field: str = "text",
    *,
    on_skip: SkipHandler,
    batch_rows: int = 1024,
) -> Iterator[Document]:
    """Stream the documents of ``shards`` in order, validating every row.

    Raises :class:`DataError` for an unreadable file, a missing column, a null
    or non-string id, a non-string text, or an id seen before in any of these
    shards (naming both places). Null, empty and whitespace-only texts are
    passed to ``on_skip`` and not yielded; ``on_skip`` is required so that
    every caller decides where skips are recorded.

    Duplicate detection keeps every id seen so far in memory (the ids, not
    the texts), so it covers exactly the shards of one call.
    """
    seen = IdRegistry()
    for shard in shards:
        shard_path = Path(shard)
        for row, record in iter_rows(shard_path, (id_field, text_field), batch_rows=batch_rows):
            doc_id = require_id(record[id_field], shard_path, row, id_field)
            seen.add(doc_id, shard_path, row)
            text = require_optional_string(record[text_field], shard_path, row, text_field)
            reason = empty_text_reason(text, text_field)
            if reason is not None:
                on_skip(Skip(doc_id, str(shard_path), row, reason))
                continue
            yield Document(doc_id, text, str(shard_path), row)


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


def require_id(value: Any, path: Path, row: int, field: str) -> str:
    """Return ``value`` if it is a usable id (a string), else raise DataError."""
    if value is None:
        raise DataError(f"{path} row {row}: column {field!r} is null")
    require_optional_string(value, path, row, field)
    return value


def require_optional_string(value: Any, path: Path, row: int, field: str) -> str | None:
    """Return ``value`` if it is a string or None, else raise DataError."""
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"{path} row {row}: column {field!r} must be a string, "
            f"got {type(value).__name__} {value!r:.60}"
        )
    return value


def _iter_parquet_rows(
    path: Path, columns: Sequence[str], optional: Sequence[str], batch_rows: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    names = parquet.schema_arrow.names
    _check_columns(path, columns, names)
    wanted = list(columns) + [c for c in optional if c in names]
    batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted)
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: failed reading rows from {row} on ({error})") from error
        if batch is None:
            return
        values = {name: batch.column(name).to_pylist() for name in wanted}
        for offset in range(batch.num_rows):
            record = {name: None for name in optional}
            record.update((name, values[name][offset]) for name in wanted)
            yield row, record
            row += 1


def _iter_jsonl_rows(
    path: Path, columns: Sequence[str], optional: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read JSON Lines one line at a time.

    The json module (rather than pyarrow's JSON reader) keeps exact line
    numbers for errors and never infers types: a value is a string only if
    the file says so. Blank lines are ignored and do not count as rows, so a
    row number is the 0-based index of the record, as in Parquet.
    """
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot open ({error})") from error
    with handle:
        row = 0
        for line_number, line in _numbered_lines(handle, path):
            if not line.strip():
                continue
            record = _parse_json_object(line, path, row, line_number)
            _check_columns(path, columns, list(record), where=f" row {row} (line {line_number})")
            yield row, {name: record.get(name) for name in (*columns, *optional)}
            row += 1


def _numbered_lines(handle: Any, path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line)``; DataError if not UTF-8 text."""
    line_number = 0
    try:
        for line_number, line in enumerate(handle, start=1):
            yield line_number, line
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} line {line_number + 1}: not UTF-8 text, so not JSON Lines ({error})"
        ) from error


def _parse_json_object(line: str, path: Path, row: int, line_number: int) -> dict[str, Any]:
    try:
        # Without its line ending, so the error's column points into this line.
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} row {row} (line {line_number}): invalid JSON ({error.msg} "
            f"at column {error.colno})"
        ) from error
    if not isinstance(record, dict):
        raise DataError(
            f"{path} row {row} (line {line_number}): expected a JSON object, "
            f"got {type(record).__name__}"
        )
    return record


def _check_columns(
    path: Path, required: Sequence[str], present: Sequence[str], where: str = ""
) -> None:
    missing = [name for name in required if name not in present]
    if missing:
        raise DataError(
            f"{path}{where}: missing column {missing[0]!r}; "
            f"columns present: {sorted(present)}"
        )


def _is_visible_shard(file: Path, root: Path) -> bool:
    relative = file.relative_to(root)
    return (
        file.is_file()
        and file.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in relative.parts)
    )


def _suffix_list() -> str:
    return ", ".join(f"*{s}" for s in sorted(SUPPORTED_SUFFIXES))
