"""Corpus shards to token batches, as configured by :class:`DataSettings`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import PARQUET_SUFFIXES, DataError, SkipHandler, iter_documents
from attribution.data.queries import QUERY_COLUMNS, read_queries
from attribution.settings import DataSettings


def column_names(shard: Path) -> list[str]:
    """Columns of a Parquet file, or keys of the first record of a JSON Lines file."""
    if shard.suffix.lower() in PARQUET_SUFFIXES:
        return pq.read_schema(shard).names
    with shard.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    return list(json.loads(line))
                except (json.JSONDecodeError, TypeError) as error:
                    raise DataError(f"{shard} row 0: not a JSON object: {error}") from error
    return []


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
        items: Iterator[Any] = iter(read_queries(settings.path, on_skip))
        to_batches: Any = batch_queries
    else:
        items = iter_documents(shards, settings.id_field, settings.text_field, on_skip=on_skip)
        to_batches = batch_documents
    share = itertools.islice(itertools.islice(items, limit), worker, None, num_workers)
    yield from to_batches(tokenizer, share, settings.batch_size, settings.max_length, on_skip)

