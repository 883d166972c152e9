"""The linear datamodeling score, its bootstrap interval and the subsets it is computed over."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from attribution.counterfactual.lds import (
    bootstrap_interval,
    linear_datamodeling_score,
    per_query_lds,
    predicted_influence,
    seed_agreement,
)
from attribution.counterfactual.subsets import draw_subsets, membership, subset_size

DOC_IDS = [f"doc-{n}" for n in range(20)]


def test_subsets_are_seeded_and_stable_when_more_are_drawn():
    first = draw_subsets(DOC_IDS, 0.5, 4, seed=3)
    more = draw_subsets(DOC_IDS, 0.5, 8, seed=3)
    assert more[:4] == first
    assert first != draw_subsets(DOC_IDS, 0.5, 4, seed=4)
    assert all(len(s.doc_ids) == 10 and len(set(s.doc_ids)) == 10 for s in more)
    assert len({s.doc_ids for s in more}) == 8
    # Corpus order inside a subset, and membership rows that say the same.
    matrix = membership(more, DOC_IDS)
    for row, subset in zip(matrix, more):
        assert [DOC_IDS[n] for n in np.flatnonzero(row)] == list(subset.doc_ids)


def test_every_subset_leaves_a_document_out():
    assert subset_size(5, 0.99) == 4
    assert subset_size(5, 0.01) == 1
    with pytest.raises(ValueError, match="fewer than two"):
        draw_subsets(["only"], 0.5, 3, 0)


def test_lds_is_the_mean_spearman_of_subset_sums_with_the_measurements():
    generator = np.random.default_rng(0)
    subsets = draw_subsets(DOC_IDS, 0.5, 12, seed=0)
    matrix = membership(subsets, DOC_IDS)
    scores = generator.normal(size=(len(DOC_IDS), 3))
    predicted = predicted_influence(matrix, scores)
    # Brute force: each subset's sum, by the ids it holds.
    by_id = dict(zip(DOC_IDS, scores))
    np.testing.assert_allclose(predicted, [sum(by_id[d] for d in s.doc_ids) for s in subsets])
    actual = predicted + generator.normal(scale=2.0, size=predicted.shape)
    actual[:, 2] = 1.0  # constant measurement: no rank correlation, left out
    result = linear_datamodeling_score(predicted, actual, ["a", "b", "c"], 0.9, 500, 0)
    expected = [spearmanr(predicted[:, q], actual[:, q]).statistic for q in range(2)]
    np.testing.assert_allclose([result.per_query["a"], result.per_query["b"]], expected)
    assert np.isnan(result.per_query["c"]) and result.left_out == 1
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.low <= result.mean <= result.high
    # A monotone transform of the measurement changes nothing; a reversed one flips the sign.
    assert per_query_lds(predicted, np.exp(predicted))[:2] == pytest.approx([1.0, 1.0])
    assert per_query_lds(predicted, -predicted)[:2] == pytest.approx([-1.0, -1.0])


def test_bootstrap_interval_is_seeded_and_narrows_with_more_queries():
    generator = np.random.default_rng(1)
    few, many = generator.normal(size=10), generator.normal(size=1000)
    assert bootstrap_interval(few, 0.95, 1000, 7) == bootstrap_interval(few, 0.95, 1000, 7)
    low, high = bootstrap_interval(many, 0.95, 1000, 7)
    assert low < many.mean() < high
    # Close to the normal interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * many.std() / np.sqrt(many.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert np.isnan(bootstrap_interval(np.array([]), 0.95, 100, 0)[0])


def test_seed_agreement_is_one_for_identical_seeds_and_nan_for_one_seed():
    generator = np.random.default_rng(2)
    one = generator.normal(size=(1, 8, 3))
    assert np.isnan(seed_agreement(one))
    assert seed_agreement(np.concatenate([one, one])) == pytest.approx(1.0)
    noisy = np.concatenate([one, one + generator.normal(scale=10.0, size=one.shape)])
    assert seed_agreement(noisy) < 0.9
