"""Every corpus form reads to the same documents as plain JSON Lines; each form's bad input is named."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data import DataError, Skip, iter_documents, list_shards
from attribution.data.formats import column_names, file_kind
from tests.data.writers import FORMATS, write_json, write_parquet, write_saved_dataset

ROWS = [{"id": f"d{i}", "text": f"document {i} says ünïcode ✓ " + "x" * i, "meta": i} for i in range(10)]


def documents(path, **kwargs) -> tuple[list[tuple], list[Skip]]:
    skips: list[Skip] = []
    docs = [(d.id, d.text) for d in iter_documents(list_shards(path), on_skip=skips.append, **kwargs)]
    return docs, skips


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_every_form_reads_like_plain_json_lines(tmp_path, form):
    expected, _ = documents(FORMATS["jsonl"](tmp_path / "plain", ROWS))
    corpus = FORMATS[form](tmp_path / form, ROWS)
    docs, skips = documents(corpus)
    assert docs == expected and skips == []
    assert {"id", "text", "meta"} <= set(column_names(list_shards(corpus)[0]))


def test_file_kinds_from_names(tmp_path):
    kinds = {name: file_kind(tmp_path / name) for name in (
        "a.jsonl.gz", "a.JSONL.ZST", "a.json.bz2", "a.ndjson.xz", "a.parquet", "a.arrow", "a.jsonl.zip", "a.parquet.gz",
        "a.csv", "a.txt.gz", "state.json")}
    assert {n: (k.format, k.compression) if k else None for n, k in kinds.items()} == {
        "a.jsonl.gz": ("json_lines", "gzip"), "a.JSONL.ZST": ("json_lines", "zstd"), "a.json.bz2": ("json", "bz2"),
        "a.ndjson.xz": ("json_lines", "xz"), "a.parquet": ("parquet", None), "a.arrow": ("arrow", None),
        "a.jsonl.zip": None, "a.parquet.gz": None, "a.csv": None, "a.txt.gz": None, "state.json": ("json", None)}


def test_compressed_and_plain_files_in_one_folder_are_all_shards(tmp_path):
    plain = write_json(tmp_path / "corpus" / "a.jsonl", ROWS[:3])
    packed = write_json(tmp_path / "corpus" / "b.jsonl.gz", ROWS[3:6])
    zst = write_json(tmp_path / "corpus" / "c.json.zst", ROWS[6:], array=True)
    assert list_shards(tmp_path / "corpus") == [plain, packed, zst]
    docs, _ = documents(tmp_path / "corpus")
    assert [d[0] for d in docs] == [r["id"] for r in ROWS]


def test_a_saved_dataset_is_its_arrow_files_in_order(tmp_path):
    folder = write_saved_dataset(tmp_path / "saved", ROWS, num_shards=3)
    shards = list_shards(folder)
    assert [s.name for s in shards] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert [d[0] for d in documents(folder)[0]] == [r["id"] for r in ROWS]
    # Inside a larger corpus folder, beside other shards.
    write_json(tmp_path / "a.jsonl", [{"id": "other", "text": "t"}])
    assert list_shards(tmp_path) == [tmp_path / "a.jsonl", *shards]
    stray = folder / "cache-1234.arrow"
    stray.write_bytes(shards[0].read_bytes())
    with pytest.raises(DataError, match=rf"{stray}: not part of the saved dataset in {folder}"):
        list_shards(folder)
    stray.unlink()
    (folder / "state.json").write_text("{broken")
    with pytest.raises(DataError, match=rf"{folder}: not a readable save_to_disk folder"):
        list_shards(folder)


def test_a_saved_dataset_dict_needs_one_split(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    single = tmp_path / "single"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(single))
    assert [d[0] for d in documents(single)[0]] == [r["id"] for r in ROWS]
    double = tmp_path / "double"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}) \
        .save_to_disk(str(double))
    with pytest.raises(DataError, match=rf"{double}: a saved DatasetDict with splits test, train; point data.path at one"):
        list_shards(double)
    assert len(documents(double / "test")[0]) == 2


def test_invalid_utf8_in_json_lines_is_reported_on_its_line(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": "é" * 50}).encode() for i in range(5000)]
    lines[3999] = b'{"id": "bad", "text": "caf\xe9"}'  # Latin-1, far past the first read buffer
    for name in ("c.jsonl", "c.jsonl.gz"):
        data = b"\n".join(lines) + b"\n"
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        with pytest.raises(DataError, match=rf"{name} row 3999 \(line 4000\): not valid UTF-8 \(byte 0xe9 at column 27\)"):
            documents(path)
        docs, skips = documents(path, on_bad_row="skip")
        assert len(docs) == 4999 and [(s.row, s.reason[:34]) for s in skips] == [(3999, "bad row: line 4000: not valid UTF-")]


def test_invalid_utf8_in_parquet_and_arrow_names_row_and_column(tmp_path):
    text = pa.array([b"fine", b"bad \xff", b"also fine"], type=pa.binary()).view(pa.string())
    table = pa.table({"id": ["a", "b", "c"], "text": text})
    pq.write_table(table, tmp_path / "c.parquet")
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("c.parquet", "c.arrow"):
        with pytest.raises(DataError, match=rf"{name} row 1: column 'text' is not valid UTF-8 \(invalid start byte at byte 4\)"):
            documents(tmp_path / name)
        docs, skips = documents(tmp_path / name, on_bad_row="skip")
        assert [d[0] for d in docs] == ["a", "c"] and [(s.row, s.item_id) for s in skips] == [(1, None)]


def test_bad_rows_are_recorded_skips_when_asked_and_an_all_bad_shard_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n\n[1, 2]\n{"id": 3, "text": "t"}\n'
                    '{"id": "d", "body": "t"}\n{"id": "e", "text": 5}\n{"id": "f", "text": "ok too"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl row 1 \(line 2\): invalid JSON"):
        documents(path)
    docs, skips = documents(path, on_bad_row="skip")
    assert [d[0] for d in docs] == ["a", "f"]
    assert [(s.item_id, s.row, s.reason.split(":")[1].strip()) for s in skips] == [
        (None, 1, "line 2"), (None, 2, "line 4"), (None, 3, "line 5"), (None, 4, "line 6"), ("e", 5, "line 7")]
    assert "expected a JSON object, got list" in skips[1].reason
    assert "column 'id' must be a string, got int" in skips[2].reason
    assert "missing column 'text'; columns present: ['body', 'id']" in skips[3].reason
    misnamed = write_json(tmp_path / "m.jsonl", [{"doc": "a", "body": "t"}, {"doc": "b", "body": "u"}])
    with pytest.raises(DataError, match=r"m\.jsonl: all 2 rows are bad \(first: .*m\.jsonl row 0 \(line 1\): missing column 'id'"):
        documents(misnamed, on_bad_row="skip")


def test_duplicates_stay_errors_when_skipping_bad_rows(tmp_path):
    path = write_json(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(DataError, match="duplicate id 'a'"):
        documents(path, on_bad_row="skip")


@pytest.mark.parametrize(("data", "looks_like"), [
    (gzip.compress(b'{"id": "a", "text": "x"}\n'), "gzip-compressed: name it \\*.gz"),
    (b"PAR1" + b"\0" * 20, "a Parquet file: name it \\*.parquet"),
])
def test_a_misnamed_binary_file_says_what_it_looks_like(tmp_path, data, looks_like):
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"c\.jsonl row 0 \(line 1\): .*; the file looks {looks_like}"):
        documents(path)


def test_a_truncated_or_corrupt_compressed_file_names_where_reading_stopped(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"id": f"d{i}", "text": "t" * 100}).encode() + b"\n" for i in range(2000)))
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"c\.jsonl\.gz line \d+: cannot read or decompress"):
        documents(path)
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError, match=r"c\.jsonl\.gz line 1: cannot read or decompress \(Not a gzipped file"):
        documents(path)


def test_json_arrays_report_rows_by_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('\ufeff[\n  {"id": "a", "text": "x"},\n  "oops",\n  {"id": "b",\n   "text": "y"}\n]\n')
    docs, skips = documents(path, on_bad_row="skip")
    assert docs == [("a", "x"), ("b", "y")]
    assert [(s.row, s.reason) for s in skips] == [(1, "bad row: line 3: expected a JSON object, got str")]
    path.write_text('[{"id": "a", "text": "x"},\n {"id": "b" "text": "y"}]')
    with pytest.raises(DataError, match=r"c\.json line 2: invalid JSON \(Expecting ',' delimiter"):
        documents(path)
    path.write_text('[{"id": "a", "text": "x"}] trailing')
    with pytest.raises(DataError, match=r"c\.json line 1: invalid JSON \(data after the closing"):
        documents(path)
    path.write_text('{\n  "id": "a",\n  "text": "x"\n}\n')
    with pytest.raises(DataError, match=r"row 0 \(line 1\): invalid JSON .*; a \.json file holds JSON Lines"):
        documents(path)
    path.write_text("[]")
    with pytest.raises(DataError, match="the corpus is empty"):
        list_shards(path)


def test_parquet_missing_column_is_an_error_of_the_file_even_when_skipping(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", [{"id": "a", "body": "x"}])
    with pytest.raises(DataError, match=r"c\.parquet: missing column 'text'; columns present: \['body', 'id'\]"):
        documents(path, on_bad_row="skip")


def test_new_shard_kinds_are_indexed_matched_and_fingerprinted_like_parquet(tmp_path):
    """A saved dataset's Arrow files and compressed JSON Lines are shards for the prefilter index
    (matched by content) and for the sweep's fingerprints, as Parquet files are."""
    from attribution.prefilter.index import open_index, update_index
    from attribution.settings import DataSettings, PrefilterSettings
    from attribution.sweep.shards import discover

    corpus = tmp_path / "corpus"
    write_saved_dataset(corpus / "saved", ROWS[:6], num_shards=2)
    write_json(corpus / "more.jsonl.zst", ROWS[6:])
    shards = list_shards(corpus)
    assert [s.name for s in shards] == ["more.jsonl.zst", "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    settings = PrefilterSettings(kind="bm25", path=str(tmp_path / "index"))
    summary = update_index(tmp_path / "index", settings, DataSettings(), shards, on_skip=lambda skip: None)
    assert (summary.shards_added, summary.documents_added) == (3, len(ROWS))
    hits = open_index(tmp_path / "index", settings, shards).top_m(["xxxxxxx"], 3)[0]
    assert hits[0].doc_id == "d7" and hits[0].shard == str(corpus / "more.jsonl.zst")
    again = update_index(tmp_path / "index", settings, DataSettings(), list_shards(corpus), on_skip=lambda skip: None)
    assert again.shards_added == 0
    found = discover(corpus, {})
    assert sorted(found) == sorted(str(s.absolute()) for s in shards) and all(len(f.sha256) == 64 for f in found.values())
