"""Tests for reading queries."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data import DataError, Query, Skip, read_queries

ROWS = [
    {"id": "q1", "prompt": "The capital of France is", "completion": " Paris", "source_ids": ["d1"]},
    {"id": "q2", "prompt": "", "completion": "Once upon a time", "source_ids": []},
    {"id": "q3", "prompt": "2 + 2 =", "completion": " 4", "source_ids": None},
]
EXPECTED = [
    Query("q1", "The capital of France is", " Paris", ("d1",)),
    Query("q2", "", "Once upon a time", ()),
    Query("q3", "2 + 2 =", " 4", ()),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path) -> tuple[list[Query], list[Skip]]:
    skips: list[Skip] = []
    return read_queries(path, on_skip=skips.append), skips


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
def test_reads_jsonl_and_parquet_alike(tmp_path, writer):
    suffix = "jsonl" if writer is write_jsonl else "parquet"
    queries, skips = read(writer(tmp_path / f"q.{suffix}", ROWS))
    assert queries == EXPECTED
    assert skips == []


def test_source_ids_column_is_optional(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "source_ids"} for row in ROWS]
    queries, _ = read(write_parquet(tmp_path / "q.parquet", rows))
    assert [q.source_ids for q in queries] == [(), (), ()]


def test_empty_completions_are_recorded_skips(tmp_path):
    rows = [
        {"id": "q1", "prompt": "p", "completion": ""},
        {"id": "q2", "prompt": "p", "completion": "  "},
        {"id": "q3", "prompt": "p", "completion": None},
        {"id": "q4", "prompt": "p", "completion": " ok"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    queries, skips = read(path)
    assert [q.id for q in queries] == ["q4"]
    assert skips == [
        Skip("q1", str(path), 0, "empty completion"),
        Skip("q2", str(path), 1, "whitespace-only completion"),
        Skip("q3", str(path), 2, "null completion"),
    ]


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "prompt": "p"}])
    with pytest.raises(DataError, match=r"q\.jsonl row 0 \(line 1\): missing column 'completion'"):
        read(path)


def test_duplicate_ids(tmp_path):
    path = write_parquet(tmp_path / "q.parquet", [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(DataError, match=r"duplicate id 'q1': .*q\.parquet row 2 repeats .*q\.parquet row 0"):
        read(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "q.parquet"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"q\.parquet"):
        read(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "q", "prompt": None, "completion": "c"}, r"row 0: column 'prompt' is null"),
        ({"id": "q", "prompt": 1, "completion": "c"}, r"row 0: column 'prompt' must be a string"),
        ({"id": 5, "prompt": "", "completion": "c"}, r"row 0: column 'id' must be a string"),
        ({"id": "q", "prompt": "", "completion": "c", "source_ids": "d1"}, r"row 0: column 'source_ids' must be a list"),
        ({"id": "q", "prompt": "", "completion": "c", "source_ids": [1]}, r"row 0: column 'source_ids' must be a list"),
    ],
)
def test_bad_values(tmp_path, row, message):
    with pytest.raises(DataError, match=r"q\.jsonl row 0 \(line 1\): " + message.removeprefix("row 0: ")):
        read(write_jsonl(tmp_path / "q.jsonl", [row]))


def test_bad_rows_are_skipped_and_recorded_when_asked(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": "q2", "prompt": null, "completion": "c"}\n' + "not json\n")
    skips: list[Skip] = []
    assert read_queries(path, on_skip=skips.append, on_bad_row="skip") == EXPECTED[:1]
    assert [(s.item_id, s.row) for s in skips] == [("q2", 1), (None, 2)]
    assert skips[0].reason.startswith("bad row: line 2: column 'prompt' is null")
    assert skips[1].reason.startswith("bad row: line 3: invalid JSON")
