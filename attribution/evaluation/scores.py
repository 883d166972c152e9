"""Scores implied by preconditioned query gradients, through the scoring engine's candidate pass.

Every method ends in the same place: per query and module a preconditioned gradient
``P_{q,m} ~= (G + lambda I)^{-1} grad_{W_m} m(q)``, compressed to rank r, and
``I(q, z) = sum_m <P_{q,m}, grad_{W_m} log p(z)>`` computed by
:class:`~attribution.scoring.candidates.CandidateScorer`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from attribution.data.batching import TokenBatch
from attribution.models import TrackedModule
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import QueryFactors, compress


@dataclass
class CandidateScores:
    """(documents, queries) scores over the candidate batches, in batch order, and the pass's wall time."""

    scores: np.ndarray
    seconds: float


def factors_from_gradients(query_ids: Sequence[str], preconditioned: Mapping[str, torch.Tensor], rank: int | None) -> QueryFactors:
    """Rank-r query factors of dense preconditioned gradients {name: (Q, d_out, d_in')}."""
    return QueryFactors(list(query_ids), {name: compress(matrices, rank) for name, matrices in preconditioned.items()})


def score_candidates(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    factors: QueryFactors,
    batches: Sequence[TokenBatch],
    dtype: torch.dtype = torch.float64,
) -> CandidateScores:
    """One candidate pass of the engine: every candidate document against every query."""
    started = time.perf_counter()
    expected_tokens = max(1, round(sum(batch.num_tokens for batch in batches) / max(1, sum(len(b.ids) for b in batches))))
    scorer = CandidateScorer(model, tracked, factors, expected_tokens, dtype=dtype)
    device = next(model.parameters()).device
    parts = [scorer.layer_scores(batch.to(device)).sum(-1).detach().to("cpu", torch.float64).numpy() for batch in batches]
    return CandidateScores(np.concatenate(parts), time.perf_counter() - started)
