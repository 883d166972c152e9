"""Tests for corpus shard discovery, streaming and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data import DataError, Document, Skip, iter_documents, list_shards

ROWS = [
    {"id": "a", "text": "the cat sat"},
    {"id": "b", "text": "on the mat"},
    {"id": "c", "text": "a dog ran"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kwargs)
    return path


def read_all(shards, **kwargs) -> tuple[list[Document], list[Skip]]:
    skips: list[Skip] = []
    docs = list(iter_documents(shards, on_skip=skips.append, **kwargs))
    return docs, skips


# --- list_shards ---------------------------------------------------------


def test_list_shards_file_dir_and_glob(tmp_path):
    b = write_parquet(tmp_path / "corpus" / "b.parquet", ROWS)
    a = write_jsonl(tmp_path / "corpus" / "a.jsonl", ROWS)
    nested = write_jsonl(tmp_path / "corpus" / "sub" / "c.json", ROWS)
    write_jsonl(tmp_path / "corpus" / ".tmp" / "partial.jsonl", ROWS)
    write_jsonl(tmp_path / "corpus" / ".hidden.jsonl", ROWS)
    (tmp_path / "corpus" / "_SUCCESS").write_text("")

    assert list_shards(a) == [a]
    assert list_shards(str(tmp_path / "corpus")) == [a, b, nested]
    assert list_shards(tmp_path / "corpus" / "*.jsonl") == [a]
    assert list_shards(f"{tmp_path}/corpus/**/*.json*") == [a, nested]
    assert list_shards(f"{tmp_path}/corpus/s*") == [nested]  # a folder matched by a glob


def test_a_file_in_a_corpus_folder_that_is_not_a_corpus_file_is_named(tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", ROWS)
    notes = tmp_path / "corpus" / "sub" / "README.md"
    notes.parent.mkdir()
    notes.write_text("not data")
    with pytest.raises(DataError, match=rf"{notes}: not a corpus file .*move it out of {notes.parent}"):
        list_shards(tmp_path / "corpus")
    assert list_shards(tmp_path / "corpus" / "*.jsonl") == [tmp_path / "corpus" / "a.jsonl"]


@pytest.mark.parametrize("name", ["missing.parquet", "missing_dir", "nothing*.jsonl"])
def test_list_shards_nothing_there(tmp_path, name):
    with pytest.raises(DataError, match=name.replace("*", r"\*")):
        list_shards(tmp_path / name)


def test_list_shards_empty_directory(tmp_path):
    (tmp_path / ".notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no corpus files"):
        list_shards(tmp_path)


def test_an_empty_corpus_is_an_error_and_an_empty_shard_a_recorded_skip(tmp_path):
    empty = tmp_path / "corpus" / "a.jsonl"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    write_parquet(tmp_path / "corpus" / "b.parquet", [{"id": "x", "text": "y"}][:0],
                  schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
    with pytest.raises(DataError, match=rf"{tmp_path / 'corpus'}: the corpus is empty: none of its 2 file\(s\) holds a row"):
        list_shards(tmp_path / "corpus")
    with pytest.raises(DataError, match="the corpus is empty"):
        list_shards(empty)
    full = write_jsonl(tmp_path / "corpus" / "c.jsonl", ROWS)
    shards = list_shards(tmp_path / "corpus")
    docs, skips = read_all(shards)
    assert [d.id for d in docs] == ["a", "b", "c"] and {d.shard for d in docs} == {str(full)}
    assert [(s.item_id, s.shard, s.row, s.reason) for s in skips] == [
        (None, str(empty), None, "empty shard: no rows"),
        (None, str(tmp_path / "corpus" / "b.parquet"), None, "empty shard: no rows"),
    ]


def test_list_shards_rejects_other_extensions(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("id,text\n")
    with pytest.raises(DataError, match="data.csv: not a corpus file"):
        list_shards(csv)
    with pytest.raises(DataError, match="data.csv: not a corpus file"):
        list_shards(tmp_path / "data.*")
    (tmp_path / "data.parquet.gz").write_bytes(b"")  # Parquet compresses inside the file
    with pytest.raises(DataError, match="data.parquet.gz: not a corpus file"):
        list_shards(tmp_path / "data.parquet.gz")


# --- reading -----------------------------------------------------------------


def test_parquet_and_jsonl_give_identical_documents(tmp_path):
    parquet = write_parquet(tmp_path / "c.parquet", ROWS)
    jsonl = write_jsonl(tmp_path / "c.jsonl", ROWS)
    from_parquet, _ = read_all([parquet])
    from_jsonl, _ = read_all([jsonl])
    assert from_parquet == [Document(r["id"], r["text"], str(parquet), i) for i, r in enumerate(ROWS)]
    assert [(d.id, d.text, d.row) for d in from_jsonl] == [
        (d.id, d.text, d.row) for d in from_parquet
    ]
    assert {d.shard for d in from_jsonl} == {str(jsonl)}


def test_custom_field_names_and_extra_columns(tmp_path):
    rows = [{"doc": "x", "body": "hello there", "meta": 3}]
    path = write_parquet(tmp_path / "c.parquet", rows)
    docs, _ = read_all([path], id_field="doc", text_field="body")
    assert docs == [Document("x", "hello there", str(path), 0)]


def test_parquet_streams_row_groups_in_order(tmp_path):
    rows = [{"id": f"d{i}", "text": f"text {i}"} for i in range(11)]
    path = write_parquet(tmp_path / "c.parquet", rows, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 6
    docs, _ = read_all([path], batch_rows=3)
    assert [(d.id, d.row) for d in docs] == [(f"d{i}", i) for i in range(11)]


def test_shards_are_read_lazily(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bad = tmp_path / "b.parquet"
    bad.write_text("not parquet")
    documents = iter_documents([good, bad], on_skip=lambda skip: None)
    assert next(documents).id == "a"
    with pytest.raises(DataError, match="b.parquet"):
        list(documents)


def test_blank_jsonl_lines_are_not_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n')
    docs, _ = read_all([path])
    assert [(d.id, d.row) for d in docs] == [("a", 0), ("b", 1)]


def test_empty_texts_are_recorded_skips(tmp_path):
    rows = [
        {"id": "a", "text": "kept"},
        {"id": "b", "text": ""},
        {"id": "c", "text": " \n\t"},
        {"id": "d", "text": None},
        {"id": "e", "text": "kept too"},
    ]
    for path in (write_parquet(tmp_path / "c.parquet", rows), write_jsonl(tmp_path / "c.jsonl", rows)):
        docs, skips = read_all([path])
        assert [d.id for d in docs] == ["a", "e"]
        assert [(s.item_id, s.shard, s.row) for s in skips] == [
            ("b", str(path), 1),
            ("c", str(path), 2),
            ("d", str(path), 3),
        ]
        assert [s.reason for s in skips] == ["empty text", "whitespace-only text", "null text"]


def test_ids_are_compared_exactly(tmp_path):
    rows = [{"id": i, "text": "t"} for i in ("a", "A", "a ", " a")]
    docs, _ = read_all([write_jsonl(tmp_path / "c.jsonl", rows)])
    assert [d.id for d in docs] == ["a", "A", "a ", " a"]


# --- errors ------------------------------------------------------------------


def test_text_file_renamed_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("id,text\na,hello\n")
    with pytest.raises(DataError, match=r"fake\.parquet.*not a readable Parquet"):
        read_all([path])


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    with pytest.raises(DataError, match=r"c\.jsonl row 1 \(line 2\): invalid JSON"):
        read_all([path])


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('["a", "x"]\n')
    with pytest.raises(DataError, match=r"c\.jsonl row 0 \(line 1\): expected a JSON object"):
        read_all([path])


def test_binary_file_renamed_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    write_parquet(path, ROWS)
    with pytest.raises(DataError, match=r"c\.jsonl"):
        read_all([path])


@pytest.mark.parametrize("writer", [write_parquet, write_jsonl])
def test_missing_column_lists_present_columns(tmp_path, writer):
    path = writer(tmp_path / f"c.{'parquet' if writer is write_parquet else 'jsonl'}",
                  [{"id": "a", "body": "x"}])
    with pytest.raises(DataError, match=r"c\.\w+.*missing column 'text'.*\['body', 'id'\]"):
        read_all([path])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "text": "x"}, {"id": 7, "text": "y"}], r"row 1 \(line 2\): column 'id' must be a string, got int"),
        ([{"id": "a", "text": "x"}, {"id": None, "text": "y"}], r"row 1 \(line 2\): column 'id' is null"),
        ([{"id": "a", "text": 3.5}], r"row 0 \(line 1\): column 'text' must be a string, got float"),
    ],
)
def test_bad_values_in_jsonl(tmp_path, rows, message):
    with pytest.raises(DataError, match=r"c\.jsonl " + message):
        read_all([write_jsonl(tmp_path / "c.jsonl", rows)])


def test_non_string_column_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", [{"id": 1, "text": "x"}])
    with pytest.raises(DataError, match=r"c\.parquet row 0: column 'id' must be a string"):
        read_all([path])


def test_null_id_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", [{"id": "a", "text": "x"}, {"id": None, "text": "y"}])
    with pytest.raises(DataError, match=r"c\.parquet row 1: column 'id' is null"):
        read_all([path])


def test_duplicate_id_within_a_shard(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [*ROWS, {"id": "b", "text": "again"}])
    with pytest.raises(DataError, match=r"duplicate id 'b': .*c\.jsonl row 3 repeats .*c\.jsonl row 1"):
        read_all([path])


def test_duplicate_id_across_shards(tmp_path):
    first = write_parquet(tmp_path / "one.parquet", ROWS)
    second = write_jsonl(tmp_path / "two.jsonl", [{"id": "x", "text": "t"}, {"id": "c", "text": "t"}])
    with pytest.raises(DataError) as error:
        read_all([first, second])
    assert f"{second} row 1 repeats {first} row 2" in str(error.value)


def test_duplicate_of_a_skipped_document_is_still_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": ""}, {"id": "a", "text": "x"}])
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_all([path])
