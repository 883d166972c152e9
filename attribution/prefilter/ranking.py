"""Streaming top-M per query over chunks of retrieval scores, ties broken by document id.

Breaking ties by id (not by arrival order) makes the result independent of shard order,
so an index extended shard by shard ranks exactly like one built at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Hit(NamedTuple):
    """One retrieved document: its id, retrieval score and the corpus file holding it."""

    doc_id: str
    score: float
    shard: str


class TopM:
    """The ``m`` highest-scoring documents of each query, merged chunk by chunk."""

    def __init__(self, num_queries: int, m: int) -> None:
        self.m = m
        self._shard_names: dict[str, int] = {}
        self._scores = [np.empty(0) for _ in range(num_queries)]
        self._ids = [np.empty(0, dtype=str) for _ in range(num_queries)]
        self._shards = [np.empty(0, dtype=np.int64) for _ in range(num_queries)]

    def update(self, query: int, doc_ids: np.ndarray, scores: np.ndarray, shard: str) -> None:
        """Merge documents of ``shard`` with their scores for query ``query``."""
        if len(self._scores[query]) == self.m:
            # Full: only documents scoring at least the current m-th can enter (a tie may, by id).
            enter = scores >= self._scores[query][-1]
            doc_ids, scores = doc_ids[enter], scores[enter]
        if len(doc_ids) == 0:
            return
        shard_index = self._shard_names.setdefault(shard, len(self._shard_names))
        scores = np.concatenate([self._scores[query], scores.astype(np.float64)])
        ids = np.concatenate([self._ids[query], doc_ids])
        shards = np.concatenate([self._shards[query], np.full(len(doc_ids), shard_index)])
        if len(scores) > self.m:
            # A partition bounds the sort to the documents at or above the m-th score (ties included).
            kth = np.partition(scores, len(scores) - self.m)[len(scores) - self.m]
            above = scores >= kth
            scores, ids, shards = scores[above], ids[above], shards[above]
        order = np.lexsort((ids, -scores))[: self.m]
        self._scores[query], self._ids[query], self._shards[query] = scores[order], ids[order], shards[order]

    def hits(self) -> list[list[Hit]]:
        names = list(self._shard_names)
        return [
            [Hit(str(doc_id), float(score), names[shard]) for doc_id, score, shard in zip(ids, scores, shards)]
            for ids, scores, shards in zip(self._ids, self._scores, self._shards)
        ]
