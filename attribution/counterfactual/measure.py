"""The measurement of each query on a model: ``m(q) = log p(completion | prompt)``, summed over the
completion's tokens, batched exactly as the engine batches the queries whose gradients it scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attribution.data.batching import batch_queries, sequence_log_prob
from attribution.data.corpus import SkipHandler
from attribution.data.queries import Query

BATCH_SIZE = 32


@torch.no_grad()
def measure_queries(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, queries: Sequence[Query], max_length: int,
                    on_skip: SkipHandler) -> dict[str, float]:
    """``{query id: m(q)}`` for every query that can be batched (the others go to ``on_skip``)."""
    model.eval()
    device = next(model.parameters()).device
    values: dict[str, float] = {}
    for batch in batch_queries(tokenizer, queries, BATCH_SIZE, max_length, on_skip):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        values.update(zip(batch.ids, sequence_log_prob(logits, batch).double().tolist()))
    return values
