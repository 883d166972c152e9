"""TF-IDF and BM25 over hashed term counts, streamed shard by shard.

Text becomes term counts ``c(t, d)`` through scikit-learn's ``HashingVectorizer`` (lower-cased
words of two or more characters, hashed into ``n_features`` buckets): stateless, so there is
no vocabulary to hold or grow, and a query is hashed exactly like a document. The index keeps
only raw counts per shard and the corpus statistics ``N`` (documents), ``df(t)`` (documents
containing t) and ``L = sum_d |d|`` (tokens, ``|d| = sum_t c(t, d)``). All three are sums over
shards, so adding shards updates them exactly, and weights are computed at query time from
the current statistics: an extended index scores exactly like one rebuilt from scratch.

TF-IDF (cosine of sublinear tf times smoothed idf)::

    idf(t)   = ln((1 + N) / (1 + df(t))) + 1
    w(t, x)  = (1 + ln c(t, x)) idf(t)       for c(t, x) > 0, else 0      (x a document or the query)
    score    = sum_t w(t, q) w(t, d) / (||w(., q)|| ||w(., d)||)

BM25 (Robertson-Sparck Jones idf, kept positive as in Lucene)::

    idf(t)   = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score    = sum_t c(t, q) idf(t) c(t, d) (k1 + 1) / (c(t, d) + k1 (1 - b + b |d| / avgdl)),   avgdl = L / N

Both are positive exactly when query and document share a term; documents sharing none
score 0 and are never retrieved, so a query may get fewer than M candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

from attribution.data.corpus import Document
from attribution.prefilter.manifest import (
    IndexedShard,
    IndexManifest,
    expect_length,
    load_array,
    load_sparse,
    save_ids,
)
from attribution.prefilter.ranking import Hit, TopM
from attribution.settings import PrefilterSettings

SPARSE_KINDS = ("tfidf", "bm25")
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
# Documents hashed per call: bounds the texts held in memory while a shard streams by.
CHUNK_DOCUMENTS = 4096


def encoder_description(settings: PrefilterSettings) -> dict[str, Any]:
    """What turns text into counts; an index answers only queries encoded the same way."""
    return {
        "analyzer": "sklearn HashingVectorizer (murmurhash3, alternate_sign=false)",
        "n_features": settings.n_features,
        "lowercase": True,
        "token_pattern": TOKEN_PATTERN,
    }


def _vectorizer(encoder: Mapping[str, Any]) -> HashingVectorizer:
    return HashingVectorizer(
        n_features=encoder["n_features"],
        lowercase=encoder["lowercase"],
        token_pattern=encoder["token_pattern"],
        alternate_sign=False,
        norm=None,
    )


def analyzer(encoder: Mapping[str, Any]) -> Callable[[str], list[str]]:
    """The terms of a text, before hashing."""
    return _vectorizer(encoder).build_analyzer()


def term_counts(encoder: Mapping[str, Any], texts: Sequence[str]) -> sp.csr_matrix:
    """``c(t, x)`` for each text: (texts, n_features) int32 CSR with sorted, summed indices."""
    counts = _vectorizer(encoder).transform(texts).astype(np.int32).tocsr()
    counts.sum_duplicates()
    counts.sort_indices()
    return counts


@dataclass(frozen=True)
class CorpusStats:
    """``N``, ``df`` and ``L`` over every indexed shard."""

    documents: int
    df: np.ndarray
    tokens: int

    def tfidf_idf(self) -> np.ndarray:
        return np.log((1.0 + self.documents) / (1.0 + self.df)) + 1.0

    def bm25_idf(self) -> np.ndarray:
        return np.log(1.0 + (self.documents - self.df + 0.5) / (self.df + 0.5))

    @property
    def average_length(self) -> float:
        # With no token in the corpus there is no entry to weigh; 1.0 only avoids a 0/0.
        return self.tokens / self.documents or 1.0


def tfidf_scores(counts: sp.csr_matrix, queries: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Cosine TF-IDF scores, (documents, queries), zero where no term is shared."""
    return _row_normalised(_tfidf_weights(counts, idf)) @ _row_normalised(_tfidf_weights(queries, idf)).T


def _tfidf_weights(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    weights = counts.astype(np.float64)
    weights.data = (1.0 + np.log(weights.data)) * idf[weights.indices]
    return weights


def _row_normalised(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    # A text with no term at all has an all-zero row; leave it zero rather than divide by 0.
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.diags(inverse) @ matrix


def bm25_scores(
    counts: sp.csr_matrix, queries: sp.csr_matrix, idf: np.ndarray, average_length: float, k1: float, b: float
) -> sp.csr_matrix:
    """BM25 scores, (documents, queries), zero where no term is shared."""
    lengths = np.asarray(counts.sum(axis=1)).ravel()
    # Only the queries' terms can contribute: weigh just those columns.
    terms = np.unique(queries.indices)
    counts = counts[:, terms].tocsr()
    saturation = k1 * (1.0 - b + b * lengths / average_length)
    row_of_entry = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    weights = counts.astype(np.float64)
    weights.data = idf[terms][weights.indices] * weights.data * (k1 + 1.0) / (weights.data + saturation[row_of_entry])
    return weights @ queries[:, terms].astype(np.float64).T


class SparseBuilder:
    """Writes each new shard's ids and counts, and the updated ``df`` at the end."""

    def __init__(self, directory: Path, manifest: IndexManifest) -> None:
        self.directory = directory
        self.manifest = manifest
        n_features = manifest.encoder["n_features"]
        self.df = (
            load_array(directory / manifest.files["df"]).astype(np.int64)
            if manifest.shards
            else np.zeros(n_features, dtype=np.int64)
        )

    def add_shard(self, shard: Path, fingerprint: str, stem: str, documents: Iterable[Document]) -> IndexedShard:
        ids: list[str] = []
        chunks: list[sp.csr_matrix] = []
        stream = iter(documents)
        while chunk := list(itertools.islice(stream, CHUNK_DOCUMENTS)):
            ids += [doc.id for doc in chunk]
            chunks.append(term_counts(self.manifest.encoder, [doc.text for doc in chunk]))
        counts = sp.vstack(chunks, format="csr") if chunks else sp.csr_matrix((0, len(self.df)), dtype=np.int32)
        # CSR indices are unique per row after sum_duplicates, so a bincount is the shard's df.
        self.df += np.bincount(counts.indices, minlength=len(self.df))
        save_ids(self.directory / f"{stem}.ids.npy", ids)
        sp.save_npz(self.directory / f"{stem}.counts.npz", counts, compressed=False)
        return IndexedShard(str(shard), fingerprint, len(ids), int(counts.sum()), stem)

    def finish(self, generation: int) -> dict[str, str]:
        name = f"df-{generation:06d}.npy"
        np.save(self.directory / name, self.df, allow_pickle=False)
        return {"df": name}


class SparseIndex:
    """TF-IDF or BM25 retrieval over the selected shards, one shard in memory at a time."""

    def __init__(
        self, directory: Path, manifest: IndexManifest, settings: PrefilterSettings, selection: Mapping[int, str]
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.settings = settings
        self.selection = selection
        df_path = directory / manifest.files["df"]
        df = load_array(df_path)
        expect_length(df_path, len(df), manifest.encoder["n_features"], "features")
        self.stats = CorpusStats(manifest.documents, df.astype(np.float64), manifest.tokens)
        self.idf = self.stats.tfidf_idf() if manifest.kind == "tfidf" else self.stats.bm25_idf()

    def top_m(self, texts: Sequence[str], m: int) -> list[list[Hit]]:
        """Each text's ``m`` best documents by score, best first (only documents sharing a term)."""
        queries = term_counts(self.manifest.encoder, texts)
        top = TopM(len(texts), m)
        for position, path in self.selection.items():
            counts, ids = self._shard(position)
            if counts.shape[0] == 0:
                continue
            scores = self._scores(counts, queries).tocsc()
            for query in range(len(texts)):
                rows = scores.indices[scores.indptr[query] : scores.indptr[query + 1]]
                values = scores.data[scores.indptr[query] : scores.indptr[query + 1]]
                positive = values > 0
                top.update(query, ids[rows[positive]], values[positive], path)
        return top.hits()

    def _scores(self, counts: sp.csr_matrix, queries: sp.csr_matrix) -> sp.csr_matrix:
        if self.manifest.kind == "tfidf":
            return tfidf_scores(counts, queries, self.idf)
        return bm25_scores(counts, queries, self.idf, self.stats.average_length, self.settings.k1, self.settings.b)

    def _shard(self, position: int) -> tuple[sp.csr_matrix, np.ndarray]:
        shard = self.manifest.shards[position]
        counts_path = self.directory / f"{shard.stem}.counts.npz"
        ids_path = self.directory / f"{shard.stem}.ids.npy"
        counts, ids = load_sparse(counts_path), load_array(ids_path)
        expect_length(counts_path, counts.shape[0], shard.documents, "documents")
        expect_length(ids_path, len(ids), shard.documents, "ids")
        expect_length(counts_path, counts.shape[1], self.manifest.encoder["n_features"], "features")
        return counts, ids
