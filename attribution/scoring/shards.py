"""The unit of scoring work: one query batch's factors against one corpus shard.

A :class:`ShardScorer` lives in the driver (``cluster.num_workers=0``) or in a Ray actor;
either way it holds the models and the query factors once and scores many units.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attribution.data.batching import TokenBatch, batch_documents
from attribution.data.corpus import Skip, SkipHandler, iter_documents
from attribution.models import TrackedModule
from attribution.prefilter.candidates import Candidates
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.markers import UnitResult, WorkUnit
from attribution.scoring.query_factors import QueryFactors
from attribution.scoring.topk import StreamingTopK
from attribution.settings import DataSettings, ScoreSettings, torch_dtype

NON_FINITE_DOCUMENT = "non-finite influence score (NaN or Inf in the document's gradient)"
# Test-only fault injection: "<shard file name>:<batch index>:<exit|raise>[:<flag file>]". With a
# flag file the fault fires once (the file records that it did); without, on every attempt.
FAULT_SWITCH = "ATTRIBUTION_TEST_FAULT"


class ShardScorer:
    """Scores work units against the query factors of every query batch of a run."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tracked: Sequence[TrackedModule],
        query_sets: Sequence[QueryFactors],
        data: DataSettings,
        score: ScoreSettings,
        candidates: Candidates | None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tracked = list(tracked)
        self.query_sets = list(query_sets)
        self.data = data
        self.score = score
        self.candidates = candidates
        self.device = next(model.parameters()).device
        # One query batch's scorer at a time: units arrive grouped by query batch.
        self._scorer: tuple[int, CandidateScorer] | None = None

    def scorer(self, query_batch: int) -> CandidateScorer:
        if self._scorer is None or self._scorer[0] != query_batch:
            scorer = CandidateScorer(self.model, self.tracked, self.query_sets[query_batch], self.data.max_length,
                                     torch_dtype(self.score.dtype))
            self._scorer = (query_batch, scorer)
        return self._scorer[1]

    def run(self, unit: WorkUnit) -> UnitResult:
        """Top and bottom rows of one shard for one query batch, with the shard's skips."""
        query_ids = self.query_sets[unit.query_batch].query_ids
        scorer = self.scorer(unit.query_batch)
        result = UnitResult(unit)
        top = StreamingTopK(query_ids, self.score.top_k, largest=True)
        bottom = StreamingTopK(query_ids, self.score.bottom_k, largest=False)
        for index, batch in enumerate(self._batches(unit, query_ids, result.skips.append)):
            _inject_fault_for_tests(unit.shard, index)
            kept, layers = finite_rows(batch, scorer.layer_scores(batch.to(self.device)), result.skips.append)
            ids = [batch.ids[i] for i in kept]
            shards = [batch.shards[i] for i in kept]
            allowed = None if self.candidates is None else self.candidates.mask(query_ids, ids)
            top.update(ids, shards, layers, allowed)
            bottom.update(ids, shards, layers, allowed)
            result.documents_scored += len(kept)
        result.positive, result.negative = top.ranked(), bottom.ranked()
        return result

    def _batches(self, unit: WorkUnit, query_ids: Sequence[str], on_skip: SkipHandler) -> Iterator[TokenBatch]:
        documents = iter_documents([Path(unit.shard)], self.data.id_field, self.data.text_field, on_skip=on_skip)
        if self.candidates is not None:
            wanted = self.candidates.union(query_ids)
            documents = (doc for doc in documents if doc.id in wanted)
        return batch_documents(self.tokenizer, documents, self.data.batch_size, self.data.max_length, on_skip)


def finite_rows(batch: TokenBatch, layer_scores: torch.Tensor, on_skip: SkipHandler) -> tuple[list[int], np.ndarray]:
    """Rows whose layer scores are all finite; the others become recorded skips, never rows."""
    layers = layer_scores.detach().to("cpu", torch.float64).numpy()
    finite = np.isfinite(layers).all(axis=(1, 2))
    for index in np.flatnonzero(~finite):
        on_skip(Skip(batch.ids[index], batch.shards[index], None, NON_FINITE_DOCUMENT))
    kept = np.flatnonzero(finite).tolist()
    return kept, layers[kept]


def _inject_fault_for_tests(shard: str, batch_index: int) -> None:
    switch = os.environ.get(FAULT_SWITCH)
    if not switch:
        return
    name, index, mode, *flag = switch.split(":")
    if Path(shard).name != name or int(index) != batch_index:
        return
    if flag:
        if Path(flag[0]).exists():
            return
        Path(flag[0]).touch()
    if mode == "exit":
        os._exit(17)
    raise RuntimeError(f"injected test fault in {shard} at batch {batch_index}")
