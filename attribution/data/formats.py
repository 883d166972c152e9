"""Reading the rows of one corpus file, whatever form it comes in.

A file's name says its form: ``*.parquet``; ``*.arrow`` (Arrow IPC, the stream format the
``datasets`` library writes, or the file format); ``*.jsonl`` / ``*.ndjson`` (JSON Lines) and
``*.json`` (JSON Lines, or one array of objects), each of the JSON forms plain or compressed
(``.gz``, ``.bz2``, ``.xz``, ``.zst``), decompressed while streaming through fsspec's codecs
(the layer ``datasets`` streams through).

Every reader streams and yields :class:`Row` s in file order. Parquet and Arrow are read by
record batch, JSON Lines line by line as bytes, each line decoded on its own, so the line a
problem is reported on is the line it is on, invalid UTF-8 included. The json module (rather
than an Arrow JSON reader) keeps those line numbers and never infers types: a value is a
string only if the file says so. A row that cannot be read is yielded with its ``problem``
(see :mod:`attribution.data.bad_input`); a file that cannot be read raises DataError.
"""

from __future__ import annotations

import codecs
import json
import lzma
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from attribution.data.bad_input import DataError

PARQUET, ARROW, JSON_LINES, JSON = "parquet", "arrow", "json_lines", "json"
# Suffix -> fsspec codec. Only single-file codecs: an archive (zip, tar) holds many files.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_FORMAT_SUFFIXES = {".parquet": PARQUET, ".arrow": ARROW, ".jsonl": JSON_LINES, ".ndjson": JSON_LINES, ".json": JSON}
_COMPRESSIBLE = (JSON_LINES, JSON)
SUPPORTED = f"*.parquet, *.arrow, *.jsonl, *.ndjson or *.json, the JSON forms plain or {'/'.join(COMPRESSIONS)}"
# First bytes of files that are not text, to say what a misnamed file really is.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed: name it *.gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: name it *.zst"),
    (b"BZh", "bzip2-compressed: name it *.bz2"),
    (b"\xfd7zXZ\x00", "xz-compressed: name it *.xz"),
    (b"PAR1", "a Parquet file: name it *.parquet"),
    (b"ARROW1", "an Arrow file: name it *.arrow"),
    (b"\xff\xff\xff\xff", "an Arrow stream: name it *.arrow"),
)
_TEXT_WHITESPACE = re.compile(r"[ \t\r\n]*")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError, zlib.error]
    try:
        from compression.zstd import ZstdError  # Python 3.14+
    except ImportError:
        try:
            from backports.zstd import ZstdError
        except ImportError:
            return tuple(errors)
    return (*errors, ZstdError)


DECOMPRESSION_ERRORS = _decompression_errors()


@dataclass(frozen=True)
class FileKind:
    format: str
    compression: str | None = None


@dataclass(frozen=True)
class Row:
    """One row of a file: ``index`` counts rows from 0, ``line`` (JSON forms) lines from 1.

    ``values`` maps the requested columns to plain Python values; it is None when the row
    could not be read, and ``problem`` says why.
    """

    index: int
    values: dict[str, Any] | None
    line: int | None = None
    problem: str | None = None


def file_kind(path: Path) -> FileKind | None:
    """The form a file's name announces, or None if it is not a corpus file."""
    name = path.name.lower()
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
            break
    for suffix, form in _FORMAT_SUFFIXES.items():
        if name.endswith(suffix) and (compression is None or form in _COMPRESSIBLE):
            return FileKind(form, compression)
    return None


def require_kind(path: Path) -> FileKind:
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{path}: not a corpus file; expected {SUPPORTED}")
    return kind


def read_rows(
    path: Path, columns: Sequence[str] = (), optional: Sequence[str] = (), batch_rows: int = 1024
) -> Iterator[Row]:
    """Stream the rows of one file: ``columns`` must be there, ``optional`` ones read as None when absent.

    A required column missing from a Parquet or Arrow schema is an error of the file; in JSON,
    where each row has its own keys, it is a problem of the row.
    """
    kind = require_kind(path)
    if kind.format == PARQUET:
        return _parquet_rows(path, columns, optional, batch_rows)
    if kind.format == ARROW:
        return _arrow_rows(path, columns, optional)
    return _json_rows(path, kind, columns, optional)


def column_names(path: Path) -> list[str]:
    """Columns of a Parquet or Arrow file, or the keys of the first readable row of a JSON file."""
    kind = require_kind(path)
    if kind.format == PARQUET:
        return _open_parquet(path).schema_arrow.names
    if kind.format == ARROW:
        with _open_arrow(path) as (schema, _):
            return schema.names
    with closing(_json_rows(path, kind, (), (), all_keys=True)) as rows:
        return next((list(row.values) for row in rows if row.values is not None), [])


def is_empty(path: Path) -> bool:
    """Whether the file has no row at all (a bad row is still a row)."""
    kind = require_kind(path)
    if kind.format == PARQUET:
        return _open_parquet(path).metadata.num_rows == 0
    if kind.format == ARROW:
        with _open_arrow(path) as (_, batches):
            return all(batch.num_rows == 0 for batch in batches)
    with closing(_json_rows(path, kind, (), ())) as rows:
        return next(rows, None) is None


# --- Parquet and Arrow -------------------------------------------------------------------


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _parquet_rows(path: Path, columns: Sequence[str], optional: Sequence[str], batch_rows: int) -> Iterator[Row]:
    parquet = _open_parquet(path)
    names = parquet.schema_arrow.names
    _check_schema(path, columns, names)
    wanted = list(dict.fromkeys([*columns, *(c for c in optional if c in names)]))
    batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted)
    yield from _batches_rows(path, batches, wanted, optional)


@contextmanager
def _open_arrow(path: Path) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """``(schema, batches)`` of an Arrow IPC file, stream or file format, memory-mapped."""
    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Arrow file ({error})") from error
    with source:
        try:
            if source.read(6) == b"ARROW1":
                reader = ipc.open_file(source)
                batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                source.seek(0)
                reader = ipc.open_stream(source)
                batches = iter(reader)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Arrow file ({error})") from error
        yield reader.schema, batches


def _arrow_rows(path: Path, columns: Sequence[str], optional: Sequence[str]) -> Iterator[Row]:
    with _open_arrow(path) as (schema, batches):
        _check_schema(path, columns, schema.names)
        wanted = list(dict.fromkeys([*columns, *(c for c in optional if c in schema.names)]))
        yield from _batches_rows(path, (batch.select(wanted) for batch in batches), wanted, optional)


def _batches_rows(
    path: Path, batches: Iterator[pa.RecordBatch], wanted: Sequence[str], optional: Sequence[str]
) -> Iterator[Row]:
    index = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: failed reading rows from row {index} on ({error})") from error
        if batch is None:
            return
        values, problems = _batch_values(batch, wanted)
        absent = {name: None for name in optional}
        for offset in range(batch.num_rows):
            if offset in problems:
                yield Row(index, None, problem=problems[offset])
            else:
                yield Row(index, {**absent, **{name: values[name][offset] for name in wanted}})
            index += 1


def _batch_values(batch: pa.RecordBatch, wanted: Sequence[str]) -> tuple[dict[str, list[Any]], dict[int, str]]:
    """Each column as Python values; a string that is not valid UTF-8 is a problem of its row.

    Arrow does not validate UTF-8 on read: the conversion to Python finds it, so the slow
    value-by-value path runs only for a batch that holds such a string.
    """
    values: dict[str, list[Any]] = {}
    problems: dict[int, str] = {}
    for name in wanted:
        column = batch.column(name)
        try:
            values[name] = column.to_pylist()
        except UnicodeDecodeError:
            converted = []
            for offset in range(len(column)):
                try:
                    converted.append(column[offset].as_py())
                except UnicodeDecodeError as error:
                    converted.append(None)
                    problems.setdefault(offset, f"column {name!r} is not valid UTF-8 ({error.reason} at byte {error.start})")
            values[name] = converted
    return values, problems


def _check_schema(path: Path, required: Sequence[str], present: Sequence[str]) -> None:
    missing = [name for name in required if name not in present]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r}; columns present: {sorted(present)}")


# --- JSON Lines and JSON -------------------------------------------------------------------


def _open_binary(path: Path, compression: str | None) -> AbstractContextManager[IO[bytes]]:
    try:
        if compression is None:
            return path.open("rb")
        return fsspec.open(str(path), "rb", compression=compression)
    except OSError as error:
        raise DataError(f"{path}: cannot open ({error})") from error


def _json_rows(
    path: Path, kind: FileKind, columns: Sequence[str], optional: Sequence[str], all_keys: bool = False
) -> Iterator[Row]:
    """JSON Lines, or (a ``.json`` file whose first character is ``[``) one array of objects."""
    if kind.format == JSON and _first_character(path, kind.compression) == b"[":
        yield from _json_array_rows(path, kind.compression, columns, optional, all_keys)
        return
    hint = kind.format == JSON
    with _open_binary(path, kind.compression) as handle:
        index, line_number = 0, 0
        try:
            for line_number, raw in enumerate(handle, start=1):
                if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue  # blank lines are not rows
                row = _json_line_row(raw, index, line_number, columns, optional, all_keys)
                if index == 0 and row.problem is not None:
                    row = _with_hint(row, path, kind, hint)
                yield row
                index += 1
        except DECOMPRESSION_ERRORS as error:
            raise DataError(f"{path} line {line_number + 1}: cannot read or decompress ({error})") from error


def _json_line_row(
    raw: bytes, index: int, line: int, columns: Sequence[str], optional: Sequence[str], all_keys: bool
) -> Row:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Row(index, None, line, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})")
    try:
        # Without its line ending, so the error's column points into this line.
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        return Row(index, None, line, f"invalid JSON ({error.msg} at column {error.colno})")
    return _record_row(record, index, line, columns, optional, all_keys)


def _record_row(
    record: Any, index: int, line: int, columns: Sequence[str], optional: Sequence[str], all_keys: bool
) -> Row:
    if not isinstance(record, dict):
        return Row(index, None, line, f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in columns if name not in record]
    if missing:
        return Row(index, None, line, f"missing column {missing[0]!r}; columns present: {sorted(record)}")
    if all_keys:
        return Row(index, record, line)
    return Row(index, {name: record.get(name) for name in (*columns, *optional)}, line)


def _with_hint(row: Row, path: Path, kind: FileKind, is_json: bool) -> Row:
    """The first row of a file that is not JSON text at all: say what the file looks like."""
    looks_like = None
    if kind.compression is None:
        with path.open("rb") as handle:
            start = handle.read(8)
        looks_like = next((what for magic, what in _MAGIC if start.startswith(magic)), None)
    if looks_like is not None:
        return Row(row.index, None, row.line, f"{row.problem}; the file looks {looks_like}")
    if is_json and row.problem and row.problem.startswith("invalid JSON"):
        return Row(row.index, None, row.line,
                   f"{row.problem}; a .json file holds JSON Lines (one object per line) or one array of objects")
    return row


def _first_character(path: Path, compression: str | None) -> bytes:
    """The first non-whitespace byte of the (decompressed) file, b"" if there is none."""
    with _open_binary(path, compression) as handle:
        try:
            chunk = handle.read(1 << 16)
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
            while chunk:
                stripped = chunk.lstrip(b" \t\r\n")
                if stripped:
                    return stripped[:1]
                chunk = handle.read(1 << 16)
        except DECOMPRESSION_ERRORS as error:
            raise DataError(f"{path} line 1: cannot read or decompress ({error})") from error
    return b""


def _json_array_rows(
    path: Path, compression: str | None, columns: Sequence[str], optional: Sequence[str], all_keys: bool
) -> Iterator[Row]:
    """The elements of a top-level JSON array, parsed one at a time from the decoded text.

    The file is read whole (JSON Lines streams; an array cannot be split without parsing it),
    so a malformed array is an error of the file: there is no next row to resynchronise on.
    """
    with _open_binary(path, compression) as handle:
        try:
            data = handle.read()
        except DECOMPRESSION_ERRORS as error:
            raise DataError(f"{path}: cannot read or decompress ({error})") from error
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x})") from error
    decoder = json.JSONDecoder()
    position = _TEXT_WHITESPACE.match(text, 0).end() + 1  # past "["
    line, counted = 1, 0
    index = 0
    position = _TEXT_WHITESPACE.match(text, position).end()
    if text.startswith("]", position):
        _expect_end(path, text, position + 1)
        return
    while True:
        line += text.count("\n", counted, position)
        counted = position
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from error
        yield _record_row(record, index, line, columns, optional, all_keys)
        index += 1
        position = _TEXT_WHITESPACE.match(text, end).end()
        if text.startswith(",", position):
            position = _TEXT_WHITESPACE.match(text, position + 1).end()
        elif text.startswith("]", position):
            _expect_end(path, text, position + 1)
            return
        else:
            where = text.count("\n", 0, position) + 1
            raise DataError(f"{path} line {where}: invalid JSON (expected ',' or ']' after array element {index - 1})")


def _expect_end(path: Path, text: str, position: int) -> None:
    rest = _TEXT_WHITESPACE.match(text, position).end()
    if rest != len(text):
        raise DataError(f"{path} line {text.count(chr(10), 0, rest) + 1}: invalid JSON (data after the closing ']')")
