"""Top-k removal: retrain without each query's top documents and measure how much worse the query gets.

For a ranking r (a method's scores, or a random draw), query q and corpus D of N documents, T_r(q)
is the k = max(1, round(fraction * N)) documents that r scores highest for q (ties in corpus
order; an unscored document, NaN, ranks last). With theta_s the recipe trained on all of D and
theta_{-T,s} the recipe trained on D minus T_r(q), both with training seed s = 0 .. K-1,

    Delta_r(q) = (1/K) sum_s [ (-m(q; theta_{-T,s})) - (-m(q; theta_s)) ]
               = (1/K) sum_s [ m(q; theta_s) - m(q; theta_{-T,s}) ]

is the increase of the query's loss -log p(completion | prompt) when its top documents are removed,
and the reported figure is the mean over queries, Delta_r = (1/Q) sum_q Delta_r(q), with a
percentile bootstrap interval over queries. A ranking that finds the documents that help q most
removes the most loss-reducing ones, so larger is better; the random ranking (k documents drawn
per query) is the floor: what removing any k documents costs, the change of batch order included.

Every (ranking, query, seed) is one model (the same documents removed share one, see
``RetrainTask.label``), so the cost is (rankings x queries + 1) x seeds models: the job removes
for the first ``removal.queries`` queries only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attribution.counterfactual.lds import bootstrap_interval

RANDOM = "random"


@dataclass(frozen=True)
class RemovalResult:
    """One ranking's mean loss increase over queries, its bootstrap interval, and every query's own."""

    ranking: str
    mean: float
    low: float
    high: float
    per_query: dict[str, float]
    removed: int  # k, documents removed per query


def removal_count(num_documents: int, fraction: float) -> int:
    """k = round(fraction * N), at least 1 and at most N - 1 (something is left to train on)."""
    return min(max(1, round(fraction * num_documents)), num_documents - 1)


def top_documents(scores: np.ndarray, doc_ids: Sequence[str], count: int) -> tuple[str, ...]:
    """The ``count`` documents of highest score (a (documents,) column), in corpus order."""
    ranked = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:count]
    return tuple(doc_ids[n] for n in sorted(ranked))


def random_documents(doc_ids: Sequence[str], count: int, seed: int, query_index: int) -> tuple[str, ...]:
    """``count`` documents drawn without replacement by a generator seeded with ``(seed, query_index)``."""
    chosen = np.random.default_rng([seed, query_index]).choice(len(doc_ids), size=count, replace=False)
    return tuple(doc_ids[n] for n in sorted(chosen))


def loss_increase(full: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Delta(q) from (seeds, queries) measurements m(q) of the full-corpus and the removal models."""
    return (full - removed).mean(axis=0)


def removal_result(ranking: str, full: np.ndarray, removed: np.ndarray, query_ids: Sequence[str], count: int,
                   confidence: float, resamples: int, seed: int) -> RemovalResult:
    """The mean of Delta(q) over the queries that were measured on every model, with its interval."""
    values = loss_increase(full, removed)
    kept = values[np.isfinite(values)]
    low, high = bootstrap_interval(kept, confidence, resamples, seed)
    mean = float(kept.mean()) if kept.size else float("nan")
    return RemovalResult(ranking, mean, low, high, dict(zip(query_ids, values.tolist())), count)


def format_removal(results: Sequence[RemovalResult], confidence: float) -> str:
    """A Markdown table, as printed by the job."""
    level = f"{round(100 * confidence)}% CI"
    lines = [f"| removed (top k by) | k | queries | loss increase | {level} |", "|---|---|---|---|---|"]
    for result in results:
        queries = sum(np.isfinite(v) for v in result.per_query.values())
        interval = "-" if np.isnan(result.low) else f"[{result.low:.4f}, {result.high:.4f}]"
        lines.append(f"| {result.ranking} | {result.removed} | {queries} | {result.mean:.4f} | {interval} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class RemovalPlan:
    """What each ranking removes: ``removed[ranking][i]`` are the documents T_r(q_i) of query ``query_ids[i]``."""

    query_ids: tuple[str, ...]
    count: int
    removed: dict[str, tuple[tuple[str, ...], ...]]

    def training_sets(self, doc_ids: Sequence[str]) -> list[tuple[str, ...]]:
        """The distinct corpora to retrain on, in corpus order: the full corpus first, then D minus each T."""
        sets = [tuple(doc_ids)]
        for per_query in self.removed.values():
            for removed in per_query:
                kept = without(doc_ids, removed)
                if kept not in sets:
                    sets.append(kept)
        return sets


def without(doc_ids: Sequence[str], removed: Sequence[str]) -> tuple[str, ...]:
    """The corpus (in its order) minus the ``removed`` documents."""
    left_out = set(removed)
    return tuple(d for d in doc_ids if d not in left_out)


def plan_removal(rankings: dict[str, np.ndarray], doc_ids: Sequence[str], query_ids: Sequence[str], queries: int,
                 fraction: float, random: bool, seed: int) -> RemovalPlan:
    """T_r(q) for the first ``queries`` queries of every ranking ((documents, queries) scores, columns in
    ``query_ids`` order), then the random ranking when ``random``."""
    count = removal_count(len(doc_ids), fraction)
    chosen = list(query_ids[:queries])
    removed = {name: tuple(top_documents(scores[:, q], doc_ids, count) for q in range(len(chosen)))
               for name, scores in rankings.items()}
    if random:
        removed[RANDOM] = tuple(random_documents(doc_ids, count, seed, q) for q in range(len(chosen)))
    return RemovalPlan(tuple(chosen), count, removed)
