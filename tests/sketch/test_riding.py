"""Sketches kept by a score run (``score.keep_sketches``): the pass over every document writes the
same index ``jobs.build_index`` would (checked against it, document by document), its scores are
unchanged, a rerun adds nothing, a new shard adds only itself, a failed unit's shard is named, and
a run that scores only candidates is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from attribution.prefilter.index import update_index
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.run import run_score
from attribution.scoring.shards import FAULT_SWITCH
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    PrefilterSettings,
    ScoreSettings,
    SettingsError,
)
from tests.prefilter.helpers import TEXTS
from tests.sketch.helpers import fitted_world, stored_vectors

# Compressed to 24 of 64 principal coordinates, 8-bit codes, every document in the basis sample.
SKETCH = {"sketch_dim": 8, "sketch_components": 24, "sketch_bits": 8, "sketch_basis_documents": len(TEXTS)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kept-sketches")
    return root, *fitted_world(root)

def kept_run(setup, output_dir: Path, index: Path, data: DataSettings | None = None, keep: bool = True,
             cluster: ClusterSettings = ClusterSettings(num_workers=0)):
    _, _, model, default_data, factors, queries = setup
    score = ScoreSettings(rank=None, top_k=20, query_batch_size=2, token_scores=False, progress=False, keep_sketches=keep)
    return run_score(model, data or default_data, factors, queries, score, output_dir, {},
                     prefilter_settings=PrefilterSettings(path=str(index), **SKETCH), cluster=cluster)


def built_index(setup, directory: Path) -> PrefilterSettings:
    _, shards, model, data, factors, _ = setup
    settings = PrefilterSettings(kind="gradient", path=str(directory), **SKETCH)
    update_index(directory, settings, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    return settings


def test_a_score_run_keeps_the_index_build_index_writes_and_the_same_scores(setup, tmp_path):
    kept = kept_run(setup, tmp_path / "run", tmp_path / "kept")
    plain = kept_run(setup, tmp_path / "plain", tmp_path / "unused", keep=False)
    built_index(setup, tmp_path / "built")
    kept_manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    built_manifest = json.loads((tmp_path / "built" / "manifest.json").read_text())
    # The same sample, basis and codes: one encoder, so either index serves the other's queries.
    assert kept_manifest["encoder_fingerprint"] == built_manifest["encoder_fingerprint"]
    assert [s["fingerprint"] for s in kept_manifest["shards"]] == [s["fingerprint"] for s in built_manifest["shards"]]
    assert [s["documents"] for s in kept_manifest["shards"]] == [s["documents"] for s in built_manifest["shards"]]
    ridden, separate = stored_vectors(tmp_path / "kept"), stored_vectors(tmp_path / "built")
    assert sorted(ridden) == sorted(separate) and len(ridden) == len(TEXTS) - 1  # the blank text has no target
    step = max(np.ptp(np.stack(list(separate.values())), axis=0).max() / 255, 1e-12)
    for doc_id, vector in separate.items():
        assert np.abs(ridden[doc_id] - vector).max() <= step * 1.01, doc_id
    assert not (tmp_path / "unused").exists()
    kept_rows = pq.read_table(kept.scores_path).sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    plain_rows = pq.read_table(plain.scores_path).sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    assert kept_rows["doc_id"].to_pylist() == plain_rows["doc_id"].to_pylist()
    np.testing.assert_allclose(kept_rows["score"].to_numpy(), plain_rows["score"].to_numpy(), rtol=1e-5, atol=1e-9)
    assert any("gradient sketches of 3 shard(s), 11 documents, kept in" in note for note in kept.notes)


def test_a_rerun_adds_nothing_and_a_new_shard_adds_only_itself(setup, tmp_path):
    root, shards, *_ = setup
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for shard in shards[:2]:
        shutil.copy(shard, corpus / shard.name)
    data = DataSettings(path=str(corpus), max_length=16, batch_size=3)
    kept_run(setup, tmp_path / "night-1", tmp_path / "kept", data)
    again = kept_run(setup, tmp_path / "night-1-again", tmp_path / "kept", data)
    assert any("gradient sketches of 0 shard(s), 0 documents" in note for note in again.notes)
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "kept" / "shards").iterdir()}
    shutil.copy(shards[2], corpus / shards[2].name)
    grown = kept_run(setup, tmp_path / "night-2", tmp_path / "kept", data)
    assert any("gradient sketches of 1 shard(s), 3 documents" in note for note in grown.notes)
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "kept" / "shards").iterdir()}
    assert {name: after[name] for name in before} == before and len(after) == len(before) + 2
    built_index(setup, tmp_path / "built")
    ridden, separate = stored_vectors(tmp_path / "kept"), stored_vectors(tmp_path / "built")
    assert sorted(ridden) == sorted(separate)


def test_a_failed_units_shard_is_named_and_not_kept(setup, tmp_path, monkeypatch):
    _, shards, *_ = setup
    monkeypatch.setenv(FAULT_SWITCH, f"{shards[1].name}:0:raise")
    summary = kept_run(setup, tmp_path / "run", tmp_path / "kept",
                       cluster=ClusterSettings(num_workers=0, max_retries=0, allow_failed_shards=True))
    note = next(note for note in summary.notes if note.startswith("gradient sketches"))
    assert note.startswith("gradient sketches of 2 shard(s)") and note.endswith(f"their units having failed: {shards[1]}")
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert str(shards[1]) not in [shard["path"] for shard in manifest["shards"]] and len(manifest["shards"]) == 2


def test_a_run_over_candidates_cannot_keep_sketches(setup):
    _, _, model, data, factors, queries = setup
    with pytest.raises(SettingsError, match=r"score.keep_sketches=true .* with prefilter.kind=bm25 this run scores only"):
        ScoreInputs(model, data, factors, queries, ScoreSettings(keep_sketches=True), prefilter=PrefilterSettings(kind="bm25"))


def test_an_index_of_other_sketches_is_refused_before_the_pass(setup, tmp_path):
    built_index(setup, tmp_path / "built")
    _, _, model, data, factors, queries = setup
    score = ScoreSettings(rank=None, token_scores=False, progress=False, keep_sketches=True)
    other = PrefilterSettings(path=str(tmp_path / "built"), **{**SKETCH, "sketch_seed": 1})
    with pytest.raises(Exception, match="was built with another encoder") as error:
        run_score(model, data, factors, queries, score, tmp_path / "run", {}, prefilter_settings=other)
    assert "sketch_seed" in str(error.value)
    assert not (tmp_path / "run" / "scores").exists()
