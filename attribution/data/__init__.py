"""Reading corpora and queries, and turning them into token batches."""

from attribution.data.bad_input import DataError, Skip, SkipHandler
from attribution.data.batching import (
    TokenBatch,
    batch_documents,
    batch_queries,
    pad_id,
    sequence_log_prob,
)
from attribution.data.corpus import Document, iter_documents, list_shards
from attribution.data.queries import Query, read_queries

__all__ = [
    "DataError",
    "Document",
    "Query",
    "Skip",
    "SkipHandler",
    "TokenBatch",
    "batch_documents",
    "batch_queries",
    "iter_documents",
    "list_shards",
    "pad_id",
    "read_queries",
    "sequence_log_prob",
]
