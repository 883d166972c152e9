"""Seeded random subsets of the corpus, the training sets of the linear datamodeling score.

Subset j keeps ``round(fraction * N)`` of the N documents, drawn without replacement by a
generator seeded with ``(seed, j)``: a subset depends only on the corpus, the fraction, the seed
and its own index, so asking for more subsets later keeps the first ones (and their retrained
models) unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Subset:
    """Subset ``index``'s documents, in corpus order."""

    index: int
    doc_ids: tuple[str, ...]


def subset_size(num_documents: int, fraction: float) -> int:
    """``round(fraction * N)``, at least 1 and at most N - 1, so every subset leaves something out."""
    return min(max(1, round(fraction * num_documents)), num_documents - 1)


def draw_subsets(doc_ids: Sequence[str], fraction: float, count: int, seed: int) -> list[Subset]:
    """``count`` subsets of ``doc_ids`` (in corpus order), each of ``subset_size`` documents."""
    if len(doc_ids) < 2:
        raise ValueError("a corpus of fewer than two documents has no proper subset to retrain on")
    size = subset_size(len(doc_ids), fraction)
    subsets = []
    for index in range(count):
        generator = np.random.default_rng([seed, index])
        kept = np.sort(generator.choice(len(doc_ids), size=size, replace=False))
        subsets.append(Subset(index, tuple(doc_ids[i] for i in kept)))
    return subsets


def membership(subsets: Sequence[Subset], doc_ids: Sequence[str]) -> np.ndarray:
    """The (subsets, documents) 0/1 matrix: entry (j, n) is 1 when document n is in subset j."""
    column = {doc_id: n for n, doc_id in enumerate(doc_ids)}
    matrix = np.zeros((len(subsets), len(doc_ids)), dtype=np.float64)
    for row, subset in enumerate(subsets):
        matrix[row, [column[doc_id] for doc_id in subset.doc_ids]] = 1.0
    return matrix
