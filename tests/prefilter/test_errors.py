"""Bad input: missing, corrupt, or mismatched indexes give a clear error naming the path."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data.corpus import DataError
from attribution.prefilter.index import open_index, update_index
from attribution.prefilter.manifest import MANIFEST_NAME, PrefilterError, read_manifest
from attribution.settings import DataSettings, PrefilterSettings, SettingsError
from tests.prefilter.helpers import build, write_corpus


@pytest.fixture
def index(tmp_path):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind="bm25")
    return tmp_path / "index", settings, shards


def test_missing_index(tmp_path):
    with pytest.raises(PrefilterError, match=f"no prefilter index at {tmp_path / 'nowhere'}"):
        open_index(tmp_path / "nowhere", PrefilterSettings(kind="bm25"))


def test_another_corpus(index, tmp_path):
    directory, settings, shards = index
    other = write_corpus(tmp_path / "other", ["entirely different words here"], shards=1)
    with pytest.raises(PrefilterError, match=f"{directory} was built for another corpus: shard {other[0]} .*not in the index"):
        open_index(directory, settings, other)


def test_changed_shard(index):
    directory, settings, shards = index
    pq.write_table(pa.Table.from_pylist([{"id": "doc-00", "text": "rewritten"}]), shards[0])
    with pytest.raises(PrefilterError, match=f"shard {shards[0]} does not match \\(its content changed"):
        open_index(directory, settings, shards)


def test_another_kind_or_encoder(index):
    directory, settings, shards = index
    with pytest.raises(PrefilterError, match=f"{directory} is a bm25 index, but prefilter.kind=tfidf"):
        open_index(directory, PrefilterSettings(kind="tfidf"), shards)
    another_encoder = f"{directory} was built with another encoder.*'n_features': 1048576.*'n_features': 1024"
    with pytest.raises(PrefilterError, match=another_encoder):
        open_index(directory, PrefilterSettings(kind="bm25", n_features=1024), shards)
    with pytest.raises(PrefilterError, match="another encoder"):
        update_index(directory, PrefilterSettings(kind="bm25", n_features=1024), DataSettings(), shards, on_skip=print)
    with pytest.raises(PrefilterError, match="fields 'id'/'text'"):
        update_index(directory, settings, DataSettings(text_field="body"), shards, on_skip=print)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete"])
def test_missing_or_corrupt_files(index, damage):
    directory, settings, shards = index
    manifest = read_manifest(directory)
    victim = directory / f"{manifest.shards[1].stem}.counts.npz"
    if damage == "garbage":
        victim.write_bytes(b"not a zip file")
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    with pytest.raises(PrefilterError, match=f"prefilter index file {victim} is missing|corrupt prefilter index file {victim}"):
        open_index(directory, settings, shards).top_m(["the cat"], 5)


def test_corrupt_statistics_and_ids(index):
    directory, settings, shards = index
    manifest = read_manifest(directory)
    (directory / manifest.files["df"]).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(PrefilterError, match=f"corrupt prefilter index file {directory / manifest.files['df']}"):
        open_index(directory, settings, shards)


def test_file_disagreeing_with_the_manifest(index):
    directory, settings, shards = index
    manifest = read_manifest(directory)
    ids = directory / f"{manifest.shards[0].stem}.ids.npy"
    ids.write_bytes((directory / f"{manifest.shards[1].stem}.ids.npy").read_bytes())
    payload = json.loads((directory / MANIFEST_NAME).read_text())
    payload["shards"][0]["documents"] += 1
    (directory / MANIFEST_NAME).write_text(json.dumps(payload))
    with pytest.raises(PrefilterError, match="corrupt prefilter index file .*the manifest says"):
        open_index(directory, settings, shards).top_m(["the cat"], 5)


def test_corrupt_or_future_manifest(index):
    directory, settings, shards = index
    manifest_path = directory / MANIFEST_NAME
    payload = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**payload, "format_version": 99}))
    with pytest.raises(PrefilterError, match="format_version 99"):
        open_index(directory, settings, shards)
    manifest_path.write_text("{ not json")
    with pytest.raises(PrefilterError, match=f"corrupt prefilter index manifest {manifest_path}"):
        open_index(directory, settings, shards)


def test_settings_errors(tmp_path):
    with pytest.raises(SettingsError, match="prefilter.kind='bm52'"):
        PrefilterSettings(kind="bm52")
    with pytest.raises(SettingsError, match="prefilter.index_type='lsh'"):
        PrefilterSettings(kind="dense", index_type="lsh")
    with pytest.raises(SettingsError, match="prefilter.kind=none has no index"):
        open_index(tmp_path, PrefilterSettings())


def test_duplicate_ids_across_new_shards(tmp_path):
    shards = write_corpus(tmp_path / "corpus", ["one text", "two text"], shards=2)
    pq.write_table(pa.Table.from_pylist([{"id": "doc-00", "text": "again"}]), shards[1])
    with pytest.raises(DataError, match="duplicate id 'doc-00'"):
        build(tmp_path / "index", shards, kind="tfidf")
