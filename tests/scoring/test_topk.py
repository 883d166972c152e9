"""The device top-k and the Arrow merge against a full sort, with many ties."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from attribution.scoring.tables import UNIT_ROWS_SCHEMA, RankedMerge, float_lists, rank_rows
from attribution.scoring.topk import TopK

QUERIES = 3
MODULES = 2


def full_sort(totals: np.ndarray, ordinals: np.ndarray, allowed: np.ndarray | None, k: int, largest: bool) -> list[list[int]]:
    """Per query, the first k document positions of a full sort by (-score, ordinal) or (score, ordinal)."""
    result = []
    for q in range(totals.shape[1]):
        documents = [d for d in range(len(ordinals)) if allowed is None or allowed[d, q]]
        documents.sort(key=lambda d: (-totals[d, q] if largest else totals[d, q], ordinals[d]))
        result.append(documents[:k])
    return result


def corpus(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer scores on a coarse grid (many exact ties) and distinct ordinals in a shuffled order."""
    rng = np.random.default_rng(seed)
    layers = rng.integers(-3, 3, size=(count, QUERIES, MODULES)).astype(np.float32) / 4
    ordinals = rng.permutation(count * 7)[:count].astype(np.int64)
    return layers, ordinals


@pytest.mark.parametrize("k", [1, 7, 64, 500])
@pytest.mark.parametrize("batch", [1, 5, 37])
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_a_full_sort(k, batch, largest):
    layers, ordinals = corpus(300, seed=k * 100 + batch)
    top = TopK(QUERIES, k, largest, MODULES, torch.device("cpu"))
    for start in range(0, len(ordinals), batch):
        top.update(torch.from_numpy(layers[start:start + batch]), torch.from_numpy(ordinals[start:start + batch]))
    kept = top.kept()
    totals = layers.astype(np.float64).sum(-1)
    expected = full_sort(totals, ordinals, None, k, largest)
    for q in range(QUERIES):
        assert kept.valid[q].sum().item() == len(expected[q])
        assert kept.ordinals[q][kept.valid[q]].tolist() == [int(ordinals[d]) for d in expected[q]]
        np.testing.assert_array_equal(kept.scores[q][kept.valid[q]].numpy(), totals[expected[q], q])
        np.testing.assert_array_equal(kept.layers[q][kept.valid[q]].numpy(), layers[expected[q], q])


def test_allowed_mask_keeps_each_query_to_its_candidates():
    layers, ordinals = corpus(120, seed=3)
    allowed = np.random.default_rng(4).random((120, QUERIES)) < 0.1  # fewer candidates than k for some queries
    top = TopK(QUERIES, 20, True, MODULES, torch.device("cpu"), keep_layers=False)
    for start in range(0, 120, 8):
        rows = slice(start, start + 8)
        top.update(torch.from_numpy(layers[rows]), torch.from_numpy(ordinals[rows]), torch.from_numpy(allowed[rows]))
    kept = top.kept()
    assert kept.layers is None
    expected = full_sort(layers.astype(np.float64).sum(-1), ordinals, allowed, 20, True)
    for q in range(QUERIES):
        assert kept.ordinals[q][kept.valid[q]].tolist() == [int(ordinals[d]) for d in expected[q]]
    assert any(len(e) < 20 for e in expected), "the mask must leave some query short of k candidates"


def unit_table(layers: np.ndarray, ordinals: np.ndarray, k: int, largest: bool) -> pa.Table:
    """One unit's kept rows, as a worker writes them."""
    top = TopK(QUERIES, k, largest, MODULES, torch.device("cpu"))
    top.update(torch.from_numpy(layers), torch.from_numpy(ordinals))
    kept = top.kept()
    q, j = np.nonzero(kept.valid.numpy())
    chosen = kept.ordinals.numpy()[q, j]
    return pa.table({
        "direction": ["positive" if largest else "negative"] * len(q),
        "query": pa.array(q, pa.int32()),
        "query_id": [f"q{i}" for i in q],
        "doc_id": [f"d{o}" for o in chosen],
        "score": kept.scores.numpy()[q, j],
        "layer_scores": float_lists(kept.layers.numpy()[q, j]),
        "shard": ["s"] * len(q),
        "ordinal": pa.array(chosen, pa.int64()),
    }, schema=UNIT_ROWS_SCHEMA)


@pytest.mark.parametrize("largest", [True, False])
def test_merging_units_equals_one_full_sort(largest):
    layers, ordinals = corpus(400, seed=9)
    k = 25
    cuts = [0, 3, 90, 91, 250, 400]  # uneven units, one of a single document
    merge = RankedMerge(k, largest, QUERIES)
    merge.budget = 10  # fold often: the result must not depend on when
    for start, end in zip(cuts, cuts[1:]):
        merge.add(unit_table(layers[start:end], ordinals[start:end], k, largest))
    merged = merge.result()
    expected = full_sort(layers.astype(np.float64).sum(-1), ordinals, None, k, largest)
    for q in range(QUERIES):
        rows = merged.filter(pa.compute.equal(merged["query"], q))
        assert rows["ordinal"].to_pylist() == [int(ordinals[d]) for d in expected[q]]
        assert rows["rank"].to_pylist() == list(range(1, k + 1))


def test_rank_rows_of_nothing():
    assert rank_rows(UNIT_ROWS_SCHEMA.empty_table(), 5, True).num_rows == 0
