"""What every evaluated method shares: the model, the fitting sequences and the queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from attribution.data.batching import TokenBatch, batch_documents
from attribution.data.corpus import Document
from attribution.evaluation.parameters import ParameterLayout
from attribution.models import TrackedModule, find_tracked_modules
from attribution.scoring.query_factors import per_sequence_gradients


@dataclass
class Problem:
    """``G`` is fitted on ``fit_documents``; scores explain ``query_batch``'s completions.

    ``tracked`` are the modules of the ground truth; a method may use a subset.
    """

    model: PreTrainedModel
    tokenizer: Any
    tracked: list[TrackedModule]
    fit_documents: list[Document]
    query_batch: TokenBatch
    max_length: int
    fingerprint: str

    @property
    def query_ids(self) -> list[str]:
        return list(self.query_batch.ids)

    def modules(self, selection: str) -> list[TrackedModule]:
        """The tracked modules a method uses: ``all`` (the ground truth's), ``mlp`` or a regex among them."""
        if selection == "all":
            return self.tracked
        chosen = {m.name for m in find_tracked_modules(self.model, selection)}
        return [m for m in self.tracked if m.name in chosen]

    def fit_batches(self, batch_size: int, shuffle_seed: int | None = None) -> list[TokenBatch]:
        """The fitting sequences, batched; sorted by length (less padding) unless shuffled."""
        if shuffle_seed is None:
            documents = sorted(self.fit_documents, key=lambda doc: len(doc.text))
        else:
            order = np.random.default_rng(shuffle_seed).permutation(len(self.fit_documents))
            documents = [self.fit_documents[i] for i in order]
        return list(batch_documents(self.tokenizer, documents, batch_size, self.max_length, _already_recorded))

    def query_vectors(self, tracked: Sequence[TrackedModule]) -> torch.Tensor:
        """``grad m(q)`` of every query as (Q, P) vectors of ``ParameterLayout(tracked)``, float64."""
        device = next(self.model.parameters()).device
        gradients = per_sequence_gradients(self.model, tracked, self.query_batch.to(device))
        return ParameterLayout(tracked).join(gradients)


def _already_recorded(skip: Any) -> None:
    """The workflow read these documents once and recorded their skips then."""
