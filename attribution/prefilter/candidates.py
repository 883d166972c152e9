"""Prefilter candidates for influence scoring: per query, the documents it may rank.

A query batch streams only the union of its queries' candidates (read from the shards that
hold them), scores them in one pass, and :meth:`Candidates.mask` keeps each query's ranking
to its own candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from attribution.data.queries import Query
from attribution.prefilter.index import Retriever, open_index
from attribution.prefilter.manifest import IndexManifest, PrefilterError
from attribution.prefilter.ranking import Hit
from attribution.settings import PrefilterSettings
from attribution.sketch.index import QuerySketches, SketchIndex


def query_text(query: Query) -> str:
    """What retrieval matches documents against: the prompt and its completion, as one text."""
    return query.prompt + query.completion


@dataclass
class Candidates:
    """Each query's top-M documents from the index at ``index``, out of ``searched`` documents."""

    index: str
    kind: str
    top_m: int
    searched: int
    hits: dict[str, list[Hit]]

    def union(self, query_ids: Sequence[str]) -> dict[str, str]:
        """doc_id -> shard of every candidate of these queries."""
        return {hit.doc_id: hit.shard for query_id in query_ids for hit in self.hits.get(query_id, [])}

    @cached_property
    def members(self) -> dict[str, frozenset[str]]:
        """query_id -> the ids of its candidates (built once: every scored batch asks)."""
        return {query_id: frozenset(hit.doc_id for hit in hits) for query_id, hits in self.hits.items()}

    def mask(self, query_ids: Sequence[str], doc_ids: Sequence[str]) -> np.ndarray:
        """(documents, queries) bool: True where the document is a candidate of the query."""
        sets = [self.members.get(query_id, frozenset()) for query_id in query_ids]
        return np.array([[doc_id in allowed for allowed in sets] for doc_id in doc_ids], dtype=bool).reshape(
            len(doc_ids), len(query_ids)
        )

    def counts(self) -> dict[str, int]:
        """Documents kept by each stage: searched by the prefilter, candidate pairs, distinct candidates."""
        return {
            "prefilter_searched_documents": self.searched,
            "prefilter_candidates": sum(len(hits) for hits in self.hits.values()),
            "prefilter_union": len(self.union(list(self.hits))),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "top_m": self.top_m,
            "candidates_per_query": {query_id: len(hits) for query_id, hits in self.hits.items()},
        }


def search(index: Retriever, queries: Sequence[Query], m: int, query_sketches: QuerySketches | None = None) -> list[list[Hit]]:
    """Each query's top ``m`` documents: by its text, or for a gradient index by its gradient's sketch."""
    if isinstance(index, SketchIndex):
        if query_sketches is None:
            raise PrefilterError("prefilter.kind=gradient searches with the queries' gradients: it needs the score run's model and factors")
        return index.search(query_sketches(queries), [query.id for query in queries], m)
    return index.top_m([query_text(query) for query in queries], m)


def retrieve_candidates(
    settings: PrefilterSettings, queries: Sequence[Query], corpus: Sequence[Path], output_dir: str | Path,
    query_sketches: Callable[[IndexManifest, Path], QuerySketches] | None = None,
) -> Candidates | None:
    """The top ``prefilter.top_m`` documents of ``corpus`` per query; None when ``prefilter.kind=none``.

    ``query_sketches(manifest, directory)`` loads what sketches queries for a gradient index."""
    if settings.kind == "none":
        return None
    directory = settings.index_path(output_dir)
    index = open_index(directory, settings, corpus)
    sketches = query_sketches(index.manifest, directory) if query_sketches is not None and settings.kind == "gradient" else None
    hits = search(index, queries, settings.top_m, sketches)
    searched = sum(index.manifest.shards[position].documents for position in index.selection)
    return Candidates(str(directory), settings.kind, settings.top_m, searched, {q.id: h for q, h in zip(queries, hits)})
