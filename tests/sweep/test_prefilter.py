"""With a prefilter, each night extends the index and scores each query's candidates among its shards; with
score.keep_sketches, each night's full pass adds its shards to a gradient index."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from attribution.data.queries import read_queries
from attribution.prefilter.candidates import query_text
from attribution.prefilter.index import open_index
from attribution.settings import PrefilterSettings
from tests.sweep.helpers import sweep


def test_each_night_extends_the_index_and_ranks_only_its_candidates(world):
    prefilter = PrefilterSettings(kind="bm25", top_m=3)
    index = world.output / "prefilter" / "bm25"
    settings = PrefilterSettings(kind="bm25", top_m=3, path=str(index))
    queries = read_queries(world.queries.path, on_skip=print)
    for date, shards in {"2025-01-01": (0, 1), "2025-01-02": (2, 3)}.items():
        world.arrive(*shards)
        summary = sweep(world, date, prefilter=prefilter)
        assert any("bm25 index" in m and f"added {len(shards)} shard(s)" in m for m in summary.messages)
        # Candidates as the index stood that night (its statistics grow with the corpus).
        corpus = [world.corpus / f"shard-{i}.parquet" for i in shards]
        hits = open_index(index, settings, corpus).top_m([query_text(q) for q in queries], 3)
        candidates = {q.id: {hit.doc_id for hit in h} for q, h in zip(queries, hits)}
        rows = pq.read_table(world.output / "scores" / f"sweep_date={date}").to_pylist()
        positive = [r for r in rows if r["direction"] == "positive"]
        assert {r["query_id"] for r in positive} == set(candidates)
        for row in positive:
            assert row["doc_id"] in candidates[row["query_id"]]
    assert len(json.loads((index / "manifest.json").read_text())["shards"]) == 4
    current = pq.read_table(world.output / "current" / "scores.parquet").to_pylist()
    per_query: dict[tuple[str, str], list[int]] = {}
    for row in current:
        per_query.setdefault((row["query_id"], row["direction"]), []).append(row["rank"])
    assert all(ranks == list(range(1, len(ranks) + 1)) for ranks in per_query.values())
    assert {len(ranks) for (_, direction), ranks in per_query.items() if direction == "positive"} == {4}


def test_each_night_keeps_its_new_shards_sketches_for_later_questions(world):
    world = replace(world, score=replace(world.score, keep_sketches=True))
    prefilter = PrefilterSettings(sketch_dim=4, sketch_whiten=False)  # the world scores without a factor store
    index = world.output / "prefilter" / "gradient"
    for date, shards in {"2025-01-01": (0, 1), "2025-01-02": (2, 3)}.items():
        world.arrive(*shards)
        sweep(world, date, prefilter=prefilter)
        manifest = json.loads((index / "manifest.json").read_text())
        assert sorted(Path(shard["path"]).name for shard in manifest["shards"]) == \
            [f"shard-{i}.parquet" for i in range(shards[1] + 1)]
    assert manifest["encoder"]["whitened_by"] is None and manifest["encoder"]["sketch_bits"] == 4
