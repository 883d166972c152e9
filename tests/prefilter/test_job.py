"""The build_index job and the prefilter config group, composed as Hydra composes them."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from attribution.prefilter.manifest import read_manifest
from jobs import build_index
from jobs.wiring import prefilter_settings, score_settings
from tests.prefilter.helpers import write_corpus

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_build_index_job_creates_then_extends(tmp_path, capsys):
    shards = write_corpus(tmp_path / "corpus", shards=3)
    overrides = [f"model.path={tmp_path}", f"output_dir={tmp_path / 'out'}", "prefilter.kind=tfidf"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        first = compose("build_index", overrides=[*overrides, f"data.path={shards[0]}"])
        everything = compose("build_index", overrides=[*overrides, f"data.path={tmp_path / 'corpus'}"])
    build_index.main.__wrapped__(first)
    build_index.main.__wrapped__(everything)
    lines = capsys.readouterr().out.splitlines()
    assert "added 1 shard(s), 4 documents" in lines[0] and "added 2 shard(s), 7 documents" in lines[1]
    manifest = read_manifest(tmp_path / "out" / "prefilter" / "tfidf")
    assert (manifest.kind, len(manifest.shards), manifest.documents) == ("tfidf", 3, 11)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "runs").glob("*.json"))]
    assert sorted(r["counts"]["documents_added"] for r in records) == [4, 7]
    assert [s["item_id"] for r in records for s in r["skips"]] == ["doc-08"]


def test_score_and_pipeline_configs_carry_the_prefilter_group():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for name in ("score", "pipeline"):
            cfg = compose(name, overrides=["prefilter.kind=dense", "prefilter.index_type=hnsw", "score.method=prefilter"])
            settings = prefilter_settings(cfg)
            assert (settings.kind, settings.index_type, settings.top_m) == ("dense", "hnsw", 100)
            assert score_settings(cfg).method == "prefilter"
        assert prefilter_settings(compose("score")).kind == "none"
        assert prefilter_settings(compose("build_index")).kind == "bm25"
