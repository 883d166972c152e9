"""Streaming top-k (or bottom-k) per query, kept as tensors on the scoring device.

Every document carries a stable integer *ordinal*, ``shard index * 2^40 + row``. Rows are
ordered by ``(-score, ordinal)`` (``(score, ordinal)`` for the bottom), so the k kept per
query equal the first k of a full sort of every document, whatever order batches arrive in.

Batches are buffered and folded in with one stable sort over ``(Q, k + buffered)`` whenever
the buffer holds as many documents as the ranking (at least :data:`MIN_FOLD`): the cost per
document stays a few comparisons, not a Python loop per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Ordinal = shard index * ORDINAL_STRIDE + row: 2^40 rows per shard, 2^23 shards.
ORDINAL_STRIDE = 1 << 40
EMPTY = torch.iinfo(torch.int64).max
MIN_FOLD = 256


def ordinal(shard_index: int, row: int) -> int:
    """The document's position in the run's corpus order: shard, then row."""
    return shard_index * ORDINAL_STRIDE + row


@dataclass(frozen=True)
class Ranked:
    """One row of a score table."""

    query_id: str
    rank: int
    doc_id: str
    shard: str
    score: float
    layer_scores: np.ndarray


@dataclass
class KeptRows:
    """What a :class:`TopK` kept: per query, up to k rows in rank order (CPU tensors).

    ``valid[q, j]`` is False for the padding of a query with fewer than k candidates.
    """

    scores: torch.Tensor  # (Q, k) float64
    ordinals: torch.Tensor  # (Q, k) int64
    layers: torch.Tensor | None  # (Q, k, M) float32
    valid: torch.Tensor  # (Q, k) bool


class TopK:
    """The k strongest documents per query in one direction, on ``device``."""

    def __init__(self, num_queries: int, k: int, largest: bool, num_modules: int, device: torch.device,
                 keep_layers: bool = True) -> None:
        self.k = k
        self.largest = largest
        self.keep_layers = keep_layers
        self.device = device
        # The worst possible entry: loses to any document, and to any other padding on ordinal.
        self._pad = float("-inf") if largest else float("inf")
        self._scores = torch.full((num_queries, 0), self._pad, dtype=torch.float64, device=device)
        self._ordinals = torch.full((num_queries, 0), EMPTY, dtype=torch.int64, device=device)
        self._layers = torch.zeros((num_queries, 0, num_modules), dtype=torch.float32, device=device)
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0

    def update(self, layer_scores: torch.Tensor, ordinals: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """Fold in a batch: ``layer_scores`` (B, Q, M), a document's score is its sum over M.

        ``ordinals`` (B,) int64; ``allowed`` (B, Q) bool, when given, admits document b to
        query q's ranking only where True (a prefilter's per-query candidates).
        """
        if self.k == 0 or layer_scores.shape[0] == 0:
            return
        scores = layer_scores.sum(-1, dtype=torch.float64).T  # (Q, B)
        batch_ordinals = ordinals.to(self.device).unsqueeze(0).expand_as(scores)
        if allowed is not None:
            refused = ~allowed.to(self.device).T
            scores = scores.masked_fill(refused, self._pad)
            batch_ordinals = batch_ordinals.masked_fill(refused, EMPTY)
        layers = layer_scores.to(torch.float32).transpose(0, 1) if self.keep_layers else None
        self._buffer.append((scores, batch_ordinals, layers))
        self._buffered += scores.shape[1]
        if self._buffered >= max(self.k, MIN_FOLD):
            self._fold()

    def _fold(self) -> None:
        if not self._buffer:
            return
        scores = torch.cat([self._scores] + [b[0] for b in self._buffer], dim=1)
        ordinals = torch.cat([self._ordinals] + [b[1] for b in self._buffer], dim=1)
        # Two stable sorts: by ordinal, then by score, give the order (score, then ordinal).
        by_ordinal = torch.sort(ordinals, dim=1, stable=True).indices
        by_score = torch.sort(scores.gather(1, by_ordinal), dim=1, descending=self.largest, stable=True).indices
        order = by_ordinal.gather(1, by_score)[:, : self.k]
        if self.keep_layers:
            layers = torch.cat([self._layers] + [b[2] for b in self._buffer], dim=1)
            self._layers = layers.gather(1, order.unsqueeze(-1).expand(-1, -1, layers.shape[-1]))
        self._scores = scores.gather(1, order)
        self._ordinals = ordinals.gather(1, order)
        self._buffer, self._buffered = [], 0

    def kept(self) -> KeptRows:
        """The rows kept so far, moved to the CPU."""
        self._fold()
        valid = self._ordinals != EMPTY
        layers = self._layers.cpu() if self.keep_layers else None
        return KeptRows(self._scores.cpu(), self._ordinals.cpu(), layers, valid.cpu())
