"""Top-k removal: the documents each ranking removes, the loss increase against a hand computation, the
1%-drop subsets of the LDS, and the settings' one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.counterfactual.removal import (
    RANDOM,
    format_removal,
    loss_increase,
    plan_removal,
    removal_count,
    removal_result,
    top_documents,
    without,
)
from attribution.counterfactual.settings import CounterfactualSettings
from attribution.counterfactual.subsets import draw_subsets, membership
from attribution.settings import SettingsError

DOC_IDS = [f"doc-{n}" for n in range(6)]


def test_top_documents_are_the_highest_scores_ties_in_corpus_order_nan_last():
    scores = np.array([0.5, np.nan, 2.0, 0.5, -1.0, 0.5])
    assert top_documents(scores, DOC_IDS, 1) == ("doc-2",)
    assert top_documents(scores, DOC_IDS, 3) == ("doc-0", "doc-2", "doc-3")
    assert top_documents(scores, DOC_IDS, 6)[-1] == "doc-5" and "doc-1" in top_documents(scores, DOC_IDS, 6)
    assert removal_count(1000, 0.01) == 10 and removal_count(30, 0.01) == 1 and removal_count(2, 0.9) == 1


def test_plan_removes_each_querys_top_documents_and_shares_identical_training_sets():
    scores = np.array([[3.0, 3.0, 0.0], [2.0, 2.0, 1.0], [1.0, 1.0, 2.0], [0.0, 0.0, 3.0], [-1.0, -1.0, 4.0], [-2.0, -2.0, 5.0]])
    plan = plan_removal({"a": scores, "b": -scores}, DOC_IDS, ["q1", "q2", "q3"], queries=2, fraction=0.34,
                        random=True, seed=0)
    assert plan.count == 2 and plan.query_ids == ("q1", "q2")
    assert plan.removed["a"] == (("doc-0", "doc-1"), ("doc-0", "doc-1"))
    assert plan.removed["b"] == (("doc-4", "doc-5"), ("doc-4", "doc-5"))
    assert plan.removed[RANDOM] == plan_removal({}, DOC_IDS, ["q1", "q2"], 2, 0.34, True, 0).removed[RANDOM]
    assert all(len(set(r)) == 2 for r in plan.removed[RANDOM])
    sets = plan.training_sets(DOC_IDS)
    # The full corpus first; q1 and q2 remove the same documents under a and under b: one model each.
    assert sets[0] == tuple(DOC_IDS) and sets[1] == ("doc-2", "doc-3", "doc-4", "doc-5")
    assert sets[2] == ("doc-0", "doc-1", "doc-2", "doc-3") and len(sets) == len(set(sets)) <= 5
    assert without(DOC_IDS, ("doc-5", "doc-0")) == ("doc-1", "doc-2", "doc-3", "doc-4")


def test_loss_increase_is_the_seed_mean_of_full_minus_removed_measurements():
    # m(q) = log p(completion | prompt) on two seeds x three queries.
    full = np.array([[-10.0, -20.0, -5.0], [-12.0, -18.0, -5.5]])
    removed = np.array([[-11.0, -20.5, np.nan], [-12.5, -19.0, -6.5]])
    # By hand: q1 ((-10 + 11) + (-12 + 12.5)) / 2 = 0.75; q2 (0.5 + 1.0) / 2 = 0.75; q3 not measured.
    np.testing.assert_allclose(loss_increase(full, removed)[:2], [0.75, 0.75])
    result = removal_result("ekfac", full, removed, ["q1", "q2", "q3"], 10, 0.9, 200, 0)
    assert result.mean == pytest.approx(0.75) and result.low == pytest.approx(0.75) and result.high == pytest.approx(0.75)
    assert result.per_query["q1"] == pytest.approx(0.75) and np.isnan(result.per_query["q3"]) and result.removed == 10
    assert "| ekfac | 10 | 2 | 0.7500 | [0.7500, 0.7500] |" in format_removal([result], 0.9)


def test_one_percent_drop_subsets_each_leave_out_a_different_one_percent():
    doc_ids = [f"doc-{n}" for n in range(500)]
    subsets = draw_subsets(doc_ids, 0.99, 6, seed=0)
    matrix = membership(subsets, doc_ids)
    assert (matrix.sum(axis=1) == 495).all()
    dropped = [frozenset(doc_ids) - set(s.doc_ids) for s in subsets]
    assert all(len(d) == 5 for d in dropped) and len(set(dropped)) == 6
    # The LDS's prediction is the kept sum, the total minus the dropped documents' sum: the same ranking
    # of subsets as minus the dropped sum, so one definition serves halves and 1% drops.
    scores = np.random.default_rng(0).normal(size=(500, 1))
    kept = (matrix @ scores)[:, 0]
    dropped_sum = ((1 - matrix) @ scores)[:, 0]
    np.testing.assert_allclose(kept, scores.sum() - dropped_sum)


@pytest.mark.parametrize(("section", "message"), [
    ({"removal": {"fraction": 0}}, "removal.fraction=0"),
    ({"removal": {"queries": -1}}, "removal.queries=-1"),
    ({"removal": {"methods": ["nope"]}}, "removal.methods: nope"),
    ({"removal": {"random": "yes"}}, "removal.random"),
    ({"removal": {"topk": 3}}, "unknown key(s) in removal: topk"),
    ({"lds": {"fraction": 1.0}}, "lds.fraction=1.0"),
])
def test_settings_errors_are_one_line_naming_the_key(section, message):
    with pytest.raises(SettingsError) as error:
        CounterfactualSettings.from_config({"methods": {"ekfac": {"kind": "ekfac"}}, **section})
    assert message in str(error.value) and "\n" not in str(error.value)
