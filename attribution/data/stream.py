"""Corpus shards to token batches, as configured by :class:`DataSettings`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attribution.data.batching import TokenBatch, batch_documents
from attribution.data.corpus import SkipHandler, iter_documents
from attribution.settings import DataSettings


def document_batches(
    tokenizer: Any,
    shards: Sequence[Path],
    settings: DataSettings,
    on_skip: SkipHandler,
    limit: int | None = None,
) -> Iterator[TokenBatch]:
    """Stream the first ``limit`` documents (all when None) of ``shards`` as padded batches."""
    documents = iter_documents(shards, settings.id_field, settings.text_field, on_skip=on_skip)
    yield from batch_documents(tokenizer, itertools.islice(documents, limit), settings.batch_size, settings.max_length, on_skip)
