"""What every evaluated method shares: the models, the fitting sequences and the queries.

A single-stage problem has one stage: G is fitted on the corpus's first documents with the model
that answers the queries. A multi-stage problem has two, fine-tuned first: the fine-tuned model's
G on its fine-tuning rows (objective ``log p(completion | prompt)``), and the pretrained model's
G on the corpus; queries are answered by the fine-tuned model and candidates scored on the
pretrained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import Document
from attribution.data.queries import Query
from attribution.models import TrackedModule, find_tracked_modules
from attribution.scoring.query_factors import per_sequence_gradients


@dataclass
class Stage:
    """One model and the sequences its G is fitted on: documents (``log p(z)``) or fine-tuning rows."""

    name: str
    model: PreTrainedModel
    tokenizer: Any
    tracked: list[TrackedModule]
    fit_items: Sequence[Document | Query]
    max_length: int
    fingerprint: str
    held_out_items: Sequence[Document | Query] = ()

    def modules(self, selection: str) -> list[TrackedModule]:
        """The tracked modules a method uses: ``all`` (the ground truth's), ``mlp`` or a regex among them."""
        if selection == "all":
            return self.tracked
        chosen = {m.name for m in find_tracked_modules(self.model, selection)}
        return [m for m in self.tracked if m.name in chosen]

    def fit_batches(self, batch_size: int, shuffle_seed: int | None = None, held_out: bool = False) -> list[TokenBatch]:
        """The fitting sequences (or the held-out ones), batched; sorted by length (less padding) unless shuffled."""
        items = list(self.held_out_items if held_out else self.fit_items)
        if shuffle_seed is None:
            items.sort(key=_length)
        else:
            order = np.random.default_rng(shuffle_seed).permutation(len(items))
            items = [items[i] for i in order]
        if items and isinstance(items[0], Query):
            return list(batch_queries(self.tokenizer, items, batch_size, self.max_length, _already_recorded))
        return list(batch_documents(self.tokenizer, items, batch_size, self.max_length, _already_recorded))


@dataclass
class Problem:
    """``stages`` in application order (fine-tuned first); the last one scores the candidates, the
    first one answers ``query_batch``. ``tracked`` of the last stage are the ground truth's modules."""

    stages: list[Stage]
    query_batch: TokenBatch
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidate_stage(self) -> Stage:
        return self.stages[-1]

    @property
    def query_stage(self) -> Stage:
        return self.stages[0]

    @property
    def multi_stage(self) -> bool:
        return len(self.stages) > 1

    @property
    def query_ids(self) -> list[str]:
        return list(self.query_batch.ids)

    # The single-stage view, which every per-stage method and study uses.
    @property
    def model(self) -> PreTrainedModel:
        return self.candidate_stage.model

    @property
    def tracked(self) -> list[TrackedModule]:
        return self.candidate_stage.tracked

    @property
    def fingerprint(self) -> str:
        return self.candidate_stage.fingerprint

    def modules(self, selection: str) -> list[TrackedModule]:
        return self.candidate_stage.modules(selection)

    def fit_batches(self, batch_size: int, shuffle_seed: int | None = None) -> list[TokenBatch]:
        return self.candidate_stage.fit_batches(batch_size, shuffle_seed)

    def query_vectors(self, tracked: Sequence[TrackedModule]) -> torch.Tensor:
        """``grad m(q)`` of every query on the query stage's model as (Q, P) vectors of ``ParameterLayout(tracked)``, float64."""
        stage = self.query_stage
        names = {m.name for m in tracked}
        modules = [m for m in stage.tracked if m.name in names]
        device = next(stage.model.parameters()).device
        gradients = per_sequence_gradients(stage.model, modules, self.query_batch.to(device))
        return ParameterLayout(modules).join(gradients)


def _length(item: Document | Query) -> int:
    return len(item.text) if isinstance(item, Document) else len(item.prompt) + len(item.completion)


def _already_recorded(skip: Any) -> None:
    """The workflow read these documents once and recorded their skips then."""
