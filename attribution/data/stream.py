"""Corpus shards to token batches, as configured by :class:`DataSettings`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import SkipHandler, iter_documents
from attribution.data.formats import column_names
from attribution.data.queries import QUERY_COLUMNS, read_queries
from attribution.settings import DataSettings


def is_prompt_completion(shards: Sequence[Path]) -> bool:
    """Fine-tuning data (``id``/``prompt``/``completion`` rows) rather than ``id``/``text`` documents."""
    return set(QUERY_COLUMNS) <= set(column_names(shards[0]))


def training_batches(
    tokenizer: Any,
    shards: Sequence[Path],
    settings: DataSettings,
    on_skip: SkipHandler,
    limit: int | None = None,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[TokenBatch]:
    """Batches of the training objective: ``log p(z)`` for documents, ``log p(completion | prompt)``
    (completion tokens only) for fine-tuning rows, recognised by their columns.

    Of the first ``limit`` items, worker ``w`` of ``n`` takes those at positions ``i`` with
    ``i mod n = w``: any number of workers covers exactly the single-worker sample.
    """
    if is_prompt_completion(shards):
        items: Iterator[Any] = iter(read_queries(settings.path, on_skip, settings.on_bad_row))
        to_batches: Any = batch_queries
    else:
        items = iter_documents(shards, settings.id_field, settings.text_field, on_skip=on_skip,
                               on_bad_row=settings.on_bad_row)
        to_batches = batch_documents
    share = itertools.islice(itertools.islice(items, limit), worker, None, num_workers)
    yield from to_batches(tokenizer, share, settings.batch_size, settings.max_length, on_skip)

