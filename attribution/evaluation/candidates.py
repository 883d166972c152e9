"""Which documents each query is scored against.

Fact tracing reranks, per query (the protocol of Bao et al. 2025): its true sources,
the top BM25 documents for ``prompt + completion``, and documents drawn at random
from the rest of the corpus, seeded by ``(seed, query id)`` so that a query's draw does
not depend on which other queries are evaluated. Correlations with the ground truth are
measured on one seeded random sample of documents shared by every query.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.curvature.objective import sequence_seed
from attribution.data.corpus import SkipHandler
from attribution.data.queries import Query
from attribution.prefilter.candidates import query_text
from attribution.prefilter.index import open_index, update_index
from attribution.settings import DataSettings, PrefilterSettings


@dataclass
class CandidateSets:
    """Per-query rerank candidates and the shared correlation sample, all corpus ids."""

    rerank: dict[str, list[str]]
    correlation: list[str]
    missing_sources: dict[str, list[str]]  # true sources absent from the corpus, per query

    @property
    def all_ids(self) -> set[str]:
        return set(self.correlation).union(*self.rerank.values())


@dataclass
class Bm25Ranking:
    """BM25 scores per query for every document sharing a word with it (the others score 0).

    ``build_seconds``: building or extending the index; ``query_seconds``: retrieval for all queries.
    """

    scores: dict[str, dict[str, float]]
    build_seconds: float
    query_seconds: float

    def top(self, query_id: str, count: int) -> list[str]:
        """The ``count`` best documents of one query, best first (ties by id, as the index breaks none)."""
        ranked = sorted(self.scores.get(query_id, {}).items(), key=lambda item: (-item[1], item[0]))
        return [doc_id for doc_id, _ in ranked[:count]]

    def score(self, query_id: str, doc_id: str) -> float:
        return self.scores.get(query_id, {}).get(doc_id, 0.0)


def bm25_ranking(
    queries: Sequence[Query],
    data: DataSettings,
    shards: Sequence[Path],
    index_dir: Path,
    num_documents: int,
    on_skip: SkipHandler,
) -> Bm25Ranking:
    """BM25 of ``prompt + completion`` against the corpus, through the prefilter's index (built or
    extended at ``index_dir``). Asks the index for all ``num_documents`` hits per query, so
    the memory is (queries x corpus): evaluation scale, not production scale."""
    settings = PrefilterSettings(kind="bm25", path=str(index_dir), top_m=max(1, num_documents))
    started = time.perf_counter()
    update_index(index_dir, settings, data, shards, on_skip)
    built = time.perf_counter()
    hits = open_index(index_dir, settings, shards).top_m([query_text(q) for q in queries], settings.top_m)
    queried = time.perf_counter()
    scores = {query.id: {hit.doc_id: float(hit.score) for hit in query_hits} for query, query_hits in zip(queries, hits)}
    return Bm25Ranking(scores, built - started, queried - built)


def sample_ids(ids: Sequence[str], count: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``count`` ids drawn without replacement from ``ids`` minus ``exclude`` (all of them if fewer)."""
    pool = sorted(set(ids) - exclude)
    generator = np.random.default_rng(seed)
    chosen = generator.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i] for i in sorted(chosen)]


def candidate_sets(
    queries: Sequence[Query],
    corpus_ids: Sequence[str],
    bm25: Mapping[str, Sequence[str]],
    num_random: int,
    num_correlation: int,
    seed: int,
) -> CandidateSets:
    """Rerank sets ``sources + BM25 + random`` and the correlation sample."""
    known = set(corpus_ids)
    rerank, missing = {}, {}
    for query in queries:
        sources = [doc_id for doc_id in query.source_ids if doc_id in known]
        absent = [doc_id for doc_id in query.source_ids if doc_id not in known]
        if absent:
            missing[query.id] = absent
        chosen = list(dict.fromkeys([*sources, *bm25.get(query.id, [])]))
        chosen += sample_ids(corpus_ids, num_random, sequence_seed(seed, query.id), exclude=set(chosen))
        rerank[query.id] = chosen
    correlation = sample_ids(corpus_ids, num_correlation, seed)
    return CandidateSets(rerank, correlation, missing)
