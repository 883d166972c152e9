"""Agreement with a ground truth, and fact-tracing retrieval quality.

Correlations are per query over that query's documents, then averaged over queries:

    Pearson(x, y)  = sum_i (x_i - mean x)(y_i - mean y) / (||x - mean x|| ||y - mean y||)
    Spearman(x, y) = Pearson(rank x, rank y)     (ties share their average rank)

Fact tracing ranks each query's candidates by score (ties by document id) and looks
up the true sources ``S_q``:

    MRR       = mean_q 1 / (rank of the best-ranked document of S_q)
    Recall@k  = mean_q |S_q among the top k| / |S_q|
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denominator = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def mean_per_query(scores: np.ndarray, truth: np.ndarray, correlation=spearman) -> float:
    """Average over queries (columns of two (documents, queries) arrays) of the correlation."""
    values = [correlation(scores[:, q], truth[:, q]) for q in range(scores.shape[1])]
    return float(np.nanmean(values)) if values else float("nan")


def ranking(doc_ids: Sequence[str], scores: np.ndarray) -> list[str]:
    """Documents by decreasing score, ties by id: the order the score table would list them."""
    order = np.lexsort((np.asarray(doc_ids, dtype=str), -np.asarray(scores, dtype=np.float64)))
    return [doc_ids[i] for i in order]


def reciprocal_rank(ranked: Sequence[str], sources: set[str]) -> float:
    for position, doc_id in enumerate(ranked, start=1):
        if doc_id in sources:
            return 1.0 / position
    return 0.0


def recall_at(ranked: Sequence[str], sources: set[str], k: int) -> float:
    return len(sources.intersection(ranked[:k])) / len(sources) if sources else float("nan")


def fact_tracing(rankings: Mapping[str, Sequence[str]], sources: Mapping[str, Sequence[str]], k: int = 10) -> tuple[float, float]:
    """(MRR, Recall@k) over the queries that have true sources."""
    reciprocal, recall = [], []
    for query_id, ranked in rankings.items():
        truth = set(sources.get(query_id, ()))
        if truth:
            reciprocal.append(reciprocal_rank(ranked, truth))
            recall.append(recall_at(ranked, truth, k))
    if not reciprocal:
        return float("nan"), float("nan")
    return float(np.mean(reciprocal)), float(np.mean(recall))
