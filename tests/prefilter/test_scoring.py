"""Influence scoring with a prefilter equals scoring the whole corpus, restricted to the candidates."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from attribution.data.queries import read_queries
from attribution.prefilter.candidates import query_text
from attribution.prefilter.index import open_index
from attribution.prefilter.manifest import PrefilterError
from attribution.scoring.run import run_score
from attribution.scoring.tables import SCORE_SCHEMA
from attribution.settings import DataSettings, FactorSettings, ModelSettings, PrefilterSettings, QuerySettings, ScoreSettings
from tests.prefilter.helpers import TEXTS, build, write_corpus
from tests.tiny import save_tiny_lm

QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " the mat"},
    {"id": "q-river", "prompt": "a river flows past", "completion": " the old mill"},
    {"id": "q-birds", "prompt": "birds sang over", "completion": " the hills"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefilter-score")
    shards = write_corpus(root / "corpus")
    model_dir = save_tiny_lm(root / "model", TEXTS + [q["prompt"] + q["completion"] for q in QUERIES])
    model = ModelSettings(path=str(model_dir), device="cpu")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    prefilter = build(root / "index", shards, kind="bm25", path=str(root / "index"), top_m=4)
    return root, shards, model, QuerySettings(path=str(queries)), prefilter


def score(setup, output, **overrides):
    root, shards, model, queries, _ = setup
    settings = ScoreSettings(**{"rank": None, "top_k": 20, "bottom_k": 2, "query_batch_size": 2, "token_scores": False,
                                "progress": False, **overrides.pop("score", {})})
    data = DataSettings(path=str(root / "corpus"), max_length=16, batch_size=3)
    summary = run_score(model, data, FactorSettings(strategy="identity"), queries, settings, root / output, {}, **overrides)
    return summary, pq.read_table(summary.scores_path).to_pylist()


def rows_by(rows, direction):
    grouped: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
        if row["direction"] == direction:
            grouped.setdefault(row["query_id"], []).append(row)
    return grouped


def test_prefiltered_scores_equal_full_scores_restricted_to_candidates(setup):
    root, shards, _, queries, prefilter = setup
    _, full_rows = score(setup, "full")
    summary, rows = score(setup, "prefiltered", prefilter_settings=prefilter)
    texts = [query_text(q) for q in read_queries(queries.path, on_skip=print)]
    candidates = {
        query["id"]: {hit.doc_id for hit in hits}
        for query, hits in zip(QUERIES, open_index(root / "index", prefilter, shards).top_m(texts, prefilter.top_m))
    }
    full_top, top = rows_by(full_rows, "positive"), rows_by(rows, "positive")
    assert len(full_top["q-cat"]) == 11  # every scorable document
    for query_id, allowed in candidates.items():
        expected = [row for row in full_top[query_id] if row["doc_id"] in allowed]
        assert [row["doc_id"] for row in top[query_id]] == [row["doc_id"] for row in expected]
        assert [row["score"] for row in top[query_id]] == pytest.approx([row["score"] for row in expected], rel=1e-5)
        bottom = rows_by(rows, "negative")[query_id]
        assert [row["doc_id"] for row in bottom] == [row["doc_id"] for row in expected[::-1][:2]]
    record = json.loads(summary.run_record.read_text())
    union = set().union(*candidates.values())
    assert record["counts"]["prefilter_searched_documents"] == 11
    assert record["counts"]["prefilter_candidates"] == sum(len(c) for c in candidates.values()) == 12
    assert record["counts"]["prefilter_union"] == len(union)
    assert record["config"]["prefilter_candidates"]["candidates_per_query"] == {q: 4 for q in candidates}


def test_prefilter_method_writes_its_own_score_table(setup):
    root, shards, _, queries, prefilter = setup
    summary, rows = score(setup, "bm25", score={"method": "prefilter", "top_k": 3}, prefilter_settings=prefilter)
    assert pq.read_table(summary.scores_path).schema.equals(SCORE_SCHEMA)
    assert summary.method == "bm25" and summary.token_scores_path is None
    texts = [query_text(q) for q in read_queries(queries.path, on_skip=print)]
    hits = open_index(root / "index", prefilter, shards).top_m(texts, 3)
    for query, query_hits in zip(QUERIES, hits):
        mine = [row for row in rows if row["query_id"] == query["id"]]
        expected = [(rank, hit.doc_id, hit.shard) for rank, hit in enumerate(query_hits, 1)]
        assert [(r["rank"], r["doc_id"], r["shard"]) for r in mine] == expected
        assert [r["score"] for r in mine] == [h.score for h in query_hits]
    assert {row["method"] for row in rows} == {"bm25"} and all(row["layer_scores"] == [] for row in rows)
    assert {row["direction"] for row in rows} == {"positive"}


def test_missing_index_names_its_path(setup):
    root = setup[0]
    missing = root / "no-index"
    with pytest.raises(PrefilterError, match=f"no prefilter index at {missing}"):
        score(setup, "missing", prefilter_settings=PrefilterSettings(kind="tfidf", path=str(missing)))


def test_prefilter_without_an_index_kind_is_refused(setup):
    with pytest.raises(ValueError, match="score.method=prefilter needs prefilter.kind"):
        score(setup, "none", score={"method": "prefilter"})
    with pytest.raises(ValueError, match="score.method='best'"):
        ScoreSettings(method="best")
