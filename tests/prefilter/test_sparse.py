"""TF-IDF and BM25 against plain-Python brute force; an extended index equals a rebuilt one."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from attribution.prefilter.index import open_index, update_index
from attribution.prefilter.manifest import read_manifest
from attribution.prefilter.sparse import analyzer, encoder_description, term_counts
from attribution.settings import DataSettings, PrefilterSettings
from tests.prefilter.helpers import TEXTS, build, write_corpus

QUERIES = ["the cat on the mat", "old mill by the river", "hills at dawn with birds birds", "zebra quantum", "wheat"]


def brute_force(
    kind: str, texts: list[str], queries: list[str], k1: float = 1.2, b: float = 0.75
) -> list[list[tuple[str, float]]]:
    """The formulas of attribution.prefilter.sparse, term by term over token strings."""
    analyze = analyzer(encoder_description(PrefilterSettings()))
    docs = {f"doc-{i:02d}": Counter(analyze(text)) for i, text in enumerate(texts) if text.strip()}
    n = len(docs)
    df = Counter(term for counts in docs.values() for term in counts)
    average_length = sum(sum(counts.values()) for counts in docs.values()) / n
    results = []
    for query in queries:
        query_counts = Counter(analyze(query))
        scores = {}
        for doc_id, counts in docs.items():
            if kind == "tfidf":
                def weights(c: Counter) -> dict[str, float]:
                    return {t: (1 + math.log(v)) * (math.log((1 + n) / (1 + df[t])) + 1) for t, v in c.items()}

                wq, wd = weights(query_counts), weights(counts)
                dot = sum(wq[t] * wd.get(t, 0.0) for t in wq)
                score = dot / (math.sqrt(sum(v * v for v in wq.values())) * math.sqrt(sum(v * v for v in wd.values())))
            else:
                length = sum(counts.values())
                score = 0.0
                for term, q_count in query_counts.items():
                    c = counts.get(term, 0)
                    if c:
                        idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                        score += q_count * idf * c * (k1 + 1) / (c + k1 * (1 - b + b * length / average_length))
            if score > 0:
                scores[doc_id] = score
        results.append(sorted(scores.items(), key=lambda item: (-item[1], item[0])))
    return results


def test_no_hash_collisions_in_the_test_vocabulary():
    encoder = encoder_description(PrefilterSettings())
    vocabulary = sorted({term for text in TEXTS + QUERIES for term in analyzer(encoder)(text)})
    assert len(set(term_counts(encoder, vocabulary).indices)) == len(vocabulary)


@pytest.mark.parametrize("kind,k1,b", [("tfidf", 1.2, 0.75), ("bm25", 1.2, 0.75), ("bm25", 2.0, 0.3)])
def test_scores_equal_brute_force(tmp_path, kind, k1, b):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind=kind, k1=k1, b=b)
    found = open_index(tmp_path / "index", settings, shards).top_m(QUERIES, 100)
    expected = brute_force(kind, TEXTS, QUERIES, k1, b)
    for hits, want in zip(found, expected):
        assert [hit.doc_id for hit in hits] == [doc_id for doc_id, _ in want]
        assert [hit.score for hit in hits] == pytest.approx([score for _, score in want], rel=1e-12)
    assert found[3] == []  # shares no term with any document


def test_top_m_truncates_and_names_shards(tmp_path):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind="bm25")
    hits = open_index(tmp_path / "index", settings, shards).top_m(QUERIES, 3)
    full = brute_force("bm25", TEXTS, QUERIES)
    assert [[h.doc_id for h in query_hits] for query_hits in hits] == [[d for d, _ in want[:3]] for want in full]
    by_id = {f"doc-{i:02d}": str(shards[i // 4]) for i in range(len(TEXTS))}
    assert all(hit.shard == by_id[hit.doc_id] for query_hits in hits for hit in query_hits)


def test_ties_are_broken_by_document_id(tmp_path):
    shards = write_corpus(tmp_path / "corpus", ["red fox", "blue fox", "red fox", "red fox"], shards=2)
    settings = build(tmp_path / "index", shards, kind="tfidf")
    hits = open_index(tmp_path / "index", settings, shards).top_m(["red fox"], 2)[0]
    assert [hit.doc_id for hit in hits] == ["doc-00", "doc-02"]
    assert hits[0].score == hits[1].score


@pytest.mark.parametrize("kind", ["tfidf", "bm25"])
def test_adding_shards_equals_a_full_rebuild(tmp_path, kind):
    shards = write_corpus(tmp_path / "corpus", shards=4)
    full = build(tmp_path / "full", shards, kind=kind)
    # Out of order, in two steps, the second repeating an already indexed shard.
    build(tmp_path / "grown", [shards[2], shards[0]], kind=kind)
    summary = update_index(tmp_path / "grown", full, DataSettings(), shards, on_skip=lambda skip: None)
    assert (summary.shards_added, summary.documents_added, summary.already_indexed) == (2, 6, [str(shards[0]), str(shards[2])])
    rebuilt = open_index(tmp_path / "full", full, shards).top_m(QUERIES, 100)
    grown = open_index(tmp_path / "grown", full, shards).top_m(QUERIES, 100)
    assert grown == rebuilt
    full_manifest, grown_manifest = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "grown")
    assert (grown_manifest.documents, grown_manifest.tokens) == (full_manifest.documents, full_manifest.tokens)
    np.testing.assert_array_equal(
        np.load(tmp_path / "grown" / grown_manifest.files["df"]), np.load(tmp_path / "full" / full_manifest.files["df"])
    )
    # The previous generation's statistics are gone; only the current one remains.
    assert sorted(p.name for p in (tmp_path / "grown").glob("df-*.npy")) == [grown_manifest.files["df"]]


def test_searching_a_subset_of_the_indexed_shards_keeps_global_statistics(tmp_path):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind="bm25")
    everything = open_index(tmp_path / "index", settings, shards).top_m(QUERIES, 100)
    subset = open_index(tmp_path / "index", settings, shards[1:]).top_m(QUERIES, 100)
    kept = {str(shard) for shard in shards[1:]}
    assert subset == [[hit for hit in hits if hit.shard in kept] for hits in everything]
