"""Streaming top-k (or bottom-k) per query: memory bounded by k, whatever the corpus size.

Ties are broken by document id, so the result equals a full sort by ``(-score, doc_id)``
(or ``(score, doc_id)`` for the bottom) regardless of the order documents arrive in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranked:
    query_id: str
    rank: int
    doc_id: str
    shard: str
    score: float
    layer_scores: np.ndarray


class StreamingTopK:
    """The k strongest documents per query in one direction."""

    def __init__(self, query_ids: Sequence[str], k: int, largest: bool = True) -> None:
        self.query_ids = list(query_ids)
        self.k = k
        self.largest = largest
        self._scores = [np.empty(0) for _ in self.query_ids]
        self._doc_ids = [np.empty(0, dtype=object) for _ in self.query_ids]
        self._shards = [np.empty(0, dtype=object) for _ in self.query_ids]
        self._layers: list[np.ndarray | None] = [None for _ in self.query_ids]

    def update(
        self, doc_ids: Sequence[str], shards: Sequence[str], layer_scores: np.ndarray, allowed: np.ndarray | None = None
    ) -> None:
        """Merge a batch: ``layer_scores`` is (B, Q, M); a document's score is its sum over M.

        ``allowed`` (B, Q) bool, when given, admits document b to query q's ranking only where
        True (a prefilter's per-query candidates, scored together as one batch).
        """
        if self.k == 0 or len(doc_ids) == 0:
            return
        batch_ids = np.asarray(doc_ids, dtype=object)
        batch_shards = np.asarray(shards, dtype=object)
        totals = layer_scores.sum(-1, dtype=np.float64)
        for q in range(len(self.query_ids)):
            rows = slice(None) if allowed is None else allowed[:, q]
            scores = np.concatenate([self._scores[q], totals[rows, q]])
            ids = np.concatenate([self._doc_ids[q], batch_ids[rows]])
            kept_layers = self._layers[q]
            layers = layer_scores[rows, q] if kept_layers is None else np.concatenate([kept_layers, layer_scores[rows, q]])
            order = np.lexsort((ids.astype(str), -scores if self.largest else scores))[: self.k]
            self._scores[q] = scores[order]
            self._doc_ids[q] = ids[order]
            self._shards[q] = np.concatenate([self._shards[q], batch_shards[rows]])[order]
            self._layers[q] = layers[order]

    def ranked(self) -> list[Ranked]:
        """Every kept row, per query in rank order (1 = strongest)."""
        rows = []
        for q, query_id in enumerate(self.query_ids):
            for position in range(len(self._scores[q])):
                rows.append(
                    Ranked(
                        query_id,
                        position + 1,
                        str(self._doc_ids[q][position]),
                        str(self._shards[q][position]),
                        float(self._scores[q][position]),
                        self._layers[q][position],
                    )
                )
        return rows

    def merge(self, rows: Sequence[Ranked]) -> None:
        """Fold in rows ranked elsewhere (another shard's top-k), as if their documents streamed through here.

        The top-k of a union is the top-k of the union of each part's top-k, so merging
        per-shard results gives exactly the single-pass ranking.
        """
        column = {query_id: q for q, query_id in enumerate(self.query_ids)}
        by_query: dict[str, list[Ranked]] = {}
        for row in rows:
            by_query.setdefault(row.query_id, []).append(row)
        for query_id, group in by_query.items():
            stacked = np.stack([np.asarray(r.layer_scores, dtype=np.float64) for r in group])
            layers = np.zeros((len(group), len(self.query_ids), stacked.shape[-1]))
            layers[:, column[query_id]] = stacked
            allowed = np.zeros((len(group), len(self.query_ids)), dtype=bool)
            allowed[:, column[query_id]] = True
            self.update([r.doc_id for r in group], [r.shard for r in group], layers, allowed)
