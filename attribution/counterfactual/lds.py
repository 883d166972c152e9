"""The linear datamodeling score (LDS; Park et al. 2023, TRAK) and its confidence interval.

For query q, subsets S_1 .. S_M of the corpus, models retrained on each with seeds k = 1 .. K:

    predicted   tau(q, S_j) = sum_{z in S_j} I(q, z)
    actual      y(q, S_j)   = (1/K) sum_k m(q; theta_{S_j, k})          (the seed-averaged measurement)
    LDS(q)      = Spearman_j( tau(q, S_j), y(q, S_j) )
    LDS         = mean_q LDS(q)

Training on S_j alone is, to first order, up-weighting the documents of S_j against the rest, so
the additive prediction is the subset's total score (the constant from the documents left out of
every subset drops out of a rank correlation). A query whose predictions or measurements are all
equal has no rank correlation and is left out (counted).

The interval is a percentile bootstrap over queries: ``resamples`` draws of Q queries with
replacement, the mean LDS of each, and the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribution.evaluation.metrics import spearman


@dataclass(frozen=True)
class LdsResult:
    """The mean LDS over queries with its bootstrap interval, and every query's own value."""

    mean: float
    low: float
    high: float
    per_query: dict[str, float]
    left_out: int  # queries with no rank correlation (constant predictions or measurements)


def predicted_influence(membership: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``tau``: (subsets, documents) 0/1 membership times (documents, queries) scores -> (subsets, queries)."""
    return membership @ scores


def per_query_lds(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman over subsets (rows) for every query (column); NaN where either side is constant."""
    return np.array([spearman(predicted[:, q], actual[:, q]) if _varies(predicted[:, q]) and _varies(actual[:, q])
                     else np.nan for q in range(predicted.shape[1])])


def linear_datamodeling_score(predicted: np.ndarray, actual: np.ndarray, query_ids: list[str], confidence: float,
                              resamples: int, seed: int) -> LdsResult:
    """The LDS of (subsets, queries) predictions against the seed-averaged measurements."""
    values = per_query_lds(predicted, actual)
    kept = values[np.isfinite(values)]
    low, high = bootstrap_interval(kept, confidence, resamples, seed)
    mean = float(kept.mean()) if kept.size else float("nan")
    return LdsResult(mean, low, high, dict(zip(query_ids, values.tolist())), int(values.size - kept.size))


def bootstrap_interval(values: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    if values.size == 0:
        return float("nan"), float("nan")
    generator = np.random.default_rng(seed)
    means = values[generator.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def seed_agreement(measurements: np.ndarray) -> float:
    """How reproducible retraining is: the mean over queries and seed pairs of the Spearman over subsets
    between two seeds' measurements ((seeds, subsets, queries) array; NaN with one seed). No
    attribution method can rank the subsets much better than another training seed does."""
    seeds = measurements.shape[0]
    values = [per_query_lds(measurements[a], measurements[b]) for a in range(seeds) for b in range(a + 1, seeds)]
    if not values:
        return float("nan")
    stacked = np.concatenate(values)
    return float(np.nanmean(stacked)) if np.isfinite(stacked).any() else float("nan")


def _varies(column: np.ndarray) -> bool:
    return bool(np.ptp(column) > 0)
