"""With a prefilter, each night extends the index and scores each query's candidates among its shards."""

from __future__ import annotations

import json

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
