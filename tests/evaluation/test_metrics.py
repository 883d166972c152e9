"""Correlations, fact-tracing metrics and rerank candidate sets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from attribution.data.queries import Query
from attribution.evaluation.candidates import candidate_sets
from attribution.evaluation.metrics import (
    fact_tracing,
    mean_per_query,
    pearson,
    ranking,
    spearman,
)


def test_correlations_match_scipy_and_numpy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))


def test_mean_per_query_averages_columns():
    truth = np.arange(20.0).reshape(10, 2)
    scores = truth.copy()
    scores[:, 1] = -scores[:, 1]
    assert mean_per_query(scores, truth) == pytest.approx(0.0)
    assert mean_per_query(truth, truth, pearson) == pytest.approx(1.0)


def test_ranking_breaks_ties_by_id():
    assert ranking(["b", "a", "c"], np.array([1.0, 1.0, 2.0])) == ["c", "a", "b"]


def test_fact_tracing_mrr_and_recall():
    rankings = {
        "q1": ["s1", "x", "s2"] + [f"x{i}" for i in range(10)],  # first source at rank 1, both in the top 10
        "q2": [f"x{i}" for i in range(10)] + ["s3"],  # the only source at rank 11
        "q3": ["x"],  # no sources: left out
    }
    sources = {"q1": ["s1", "s2"], "q2": ["s3"], "q3": []}
    mrr, recall = fact_tracing(rankings, sources, k=10)
    assert mrr == pytest.approx((1 + 1 / 11) / 2)
    assert recall == pytest.approx((1.0 + 0.0) / 2)


def test_candidate_sets_hold_sources_bm25_and_seeded_random_documents():
    corpus = [f"d{i:03d}" for i in range(300)]
    queries = [Query("q1", "p", "c", ("d005", "missing")), Query("q2", "p", "c", ())]
    bm25 = {"q1": ["d010", "d005", "d011"], "q2": ["d020"]}
    sets = candidate_sets(queries, corpus, bm25, num_random=50, num_correlation=40, seed=3)
    assert sets.rerank["q1"][:3] == ["d005", "d010", "d011"]
    assert len(sets.rerank["q1"]) == 53 and len(set(sets.rerank["q1"])) == 53
    assert sets.missing_sources == {"q1": ["missing"]}
    assert len(sets.correlation) == 40
    # A query's random documents depend on its id and the seed, not on the other queries.
    alone = candidate_sets(queries[1:], corpus, bm25, num_random=50, num_correlation=40, seed=3)
    assert alone.rerank["q2"] == sets.rerank["q2"]
    other_seed = candidate_sets(queries[1:], corpus, bm25, num_random=50, num_correlation=40, seed=4)
    assert other_seed.rerank["q2"] != sets.rerank["q2"]
