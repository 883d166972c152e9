"""Dense retrieval with the packaged MiniLM: approximate indexes against the exact one, adds, errors.

The model is loaded once and every text is embedded once per session (``embeddings``), so
the three index types are built and searched through the real code on the same vectors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data.corpus import Skip, iter_documents, list_shards
from attribution.data.queries import Query, read_queries
from attribution.demo.train import ensure_demo
from attribution.prefilter import dense
from attribution.prefilter.candidates import retrieve_candidates
from attribution.prefilter.index import open_index, update_index
from attribution.prefilter.manifest import PrefilterError, read_manifest
from attribution.settings import DataSettings, PrefilterSettings
from tests.prefilter.helpers import TEXTS, build, write_corpus

APPROXIMATE = {
    # The demo's embeddings are not clustered: finding 95% of a top-100 (an eighth of the
    # corpus) takes scanning 10 of 16 cells. IVF pays off on corpora far larger than M.
    "ivf": {"index_type": "ivf", "nlist": 16, "nprobe": 10},
    "hnsw": {"index_type": "hnsw", "hnsw_m": 16, "ef_construction": 100, "ef_search": 128},
}


class MemoEncoder:
    """The real encoder, remembering each text's embedding across the session."""

    def __init__(self, encoder: dense.Encoder) -> None:
        self.encoder = encoder
        self.memory: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, texts):
        missing = [text for text in dict.fromkeys(texts) if text not in self.memory]
        if missing:
            self.memory.update(zip(missing, self.encoder.encode(missing)))
        return np.stack([self.memory[text] for text in texts])


@pytest.fixture(scope="session")
def memo_encoder() -> MemoEncoder:
    return MemoEncoder(dense.Encoder(dense.model_directory(None), "cpu", 64))


@pytest.fixture
def embeddings(monkeypatch, memo_encoder):
    monkeypatch.setattr(dense, "Encoder", lambda *args: memo_encoder)
    return memo_encoder


def demo_corpus(directory: Path) -> tuple[list[Path], list[str]]:
    """The demo documents as two shards, and retrieval queries: the demo queries and every tenth document."""
    demo = ensure_demo()
    docs = list(iter_documents(list_shards(demo.corpus_dir), on_skip=lambda skip: None))
    directory.mkdir()
    half = len(docs) // 2
    for index, part in enumerate([docs[:half], docs[half:]]):
        pq.write_table(pa.Table.from_pylist([{"id": d.id, "text": d.text} for d in part]), directory / f"part-{index}.parquet")
    queries = [q.prompt + q.completion for q in read_queries(demo.queries_path, on_skip=lambda skip: None)]
    return list_shards(directory), queries + [doc.text for doc in docs[::10]]


def overlap_with_exact(tmp_path: Path, m: int) -> dict[str, float]:
    shards, queries = demo_corpus(tmp_path / "corpus")
    exact_settings = build(tmp_path / "flat", shards, kind="dense")
    exact = open_index(tmp_path / "flat", exact_settings, shards).top_m(queries, m)
    overlap = {}
    for name, options in APPROXIMATE.items():
        settings = build(tmp_path / name, shards, kind="dense", **options)
        found = open_index(tmp_path / name, settings, shards).top_m(queries, m)
        overlap[name] = float(np.mean([
            len({h.doc_id for h in a} & {h.doc_id for h in e}) / len(e) for a, e in zip(found, exact)
        ]))
    return overlap


# MiniLM over the whole demo corpus three times: slow suite.
@pytest.mark.slow
def test_approximate_indexes_find_the_exact_top_100_on_the_demo(tmp_path, embeddings):
    overlap = overlap_with_exact(tmp_path, 100)
    assert min(overlap.values()) >= 0.95, overlap


def test_flat_scores_are_cosine_similarities(tmp_path, embeddings):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind="dense")
    hits = open_index(tmp_path / "index", settings, shards).top_m(["a cat on a mat"], 3)[0]
    kept = [text for text in TEXTS if text.strip()]
    vectors = embeddings.encode(kept)
    cosine = vectors @ embeddings.encode(["a cat on a mat"])[0]
    order = np.argsort(-cosine)[:3]
    assert [hit.doc_id for hit in hits] == [f"doc-{TEXTS.index(kept[i]):02d}" for i in order]
    assert [hit.score for hit in hits] == pytest.approx(cosine[order].tolist(), abs=1e-5)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_adding_shards_and_searching_a_subset(tmp_path, embeddings, index_type):
    shards = write_corpus(tmp_path / "corpus", shards=3)
    options = {"index_type": index_type, "nlist": 2, "nprobe": 2, "hnsw_m": 8}
    full = build(tmp_path / "full", shards, kind="dense", **options)
    build(tmp_path / "grown", shards[:1], kind="dense", **options)
    update_index(tmp_path / "grown", full, DataSettings(), shards, on_skip=lambda skip: None)
    assert read_manifest(tmp_path / "grown").documents == read_manifest(tmp_path / "full").documents == 11
    queries = ["river and mill", "birds at dawn"]
    rebuilt = open_index(tmp_path / "full", full, shards).top_m(queries, 11)
    grown = open_index(tmp_path / "grown", full, shards).top_m(queries, 11)
    assert [[h.doc_id for h in hits] for hits in grown] == [[h.doc_id for h in hits] for hits in rebuilt]
    subset = open_index(tmp_path / "grown", full, shards[1:]).top_m(queries, 11)
    assert all(len(hits) == 7 and all(h.shard != str(shards[0]) for h in hits) for hits in subset)


def test_another_model_or_structure(tmp_path, embeddings):
    shards = write_corpus(tmp_path / "corpus")
    build(tmp_path / "index", shards, kind="dense")
    # The packaged model with one config changed: another model, as far as the fingerprint can tell.
    other = tmp_path / "other-model"
    packaged = dense.model_directory(None)
    for file in packaged.rglob("*"):
        if file.is_file():
            target = other / file.relative_to(packaged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(file, target)
    (other / "config.json").unlink()
    (other / "config.json").write_text((packaged / "config.json").read_text().replace("{", '{"edited": true,', 1))
    with pytest.raises(PrefilterError, match=f"{tmp_path / 'index'} was built with another encoder"):
        open_index(tmp_path / "index", PrefilterSettings(kind="dense", model=str(other)), shards)
    with pytest.raises(PrefilterError, match="index structure {'index_type': 'flat'}"):
        hnsw = PrefilterSettings(kind="dense", index_type="hnsw")
        update_index(tmp_path / "index", hnsw, DataSettings(), shards, on_skip=print)
    with pytest.raises(PrefilterError, match="not a local sentence-transformers directory"):
        open_index(tmp_path / "index", PrefilterSettings(kind="dense", model=str(tmp_path)), shards)


def test_corrupt_faiss_file_and_too_few_documents_for_ivf(tmp_path, embeddings):
    shards = write_corpus(tmp_path / "corpus")
    settings = build(tmp_path / "index", shards, kind="dense")
    faiss_file = tmp_path / "index" / read_manifest(tmp_path / "index").files["faiss"]
    faiss_file.write_bytes(b"garbage")
    with pytest.raises(PrefilterError, match=f"corrupt prefilter index file {faiss_file}"):
        open_index(tmp_path / "index", settings, shards)
    with pytest.raises(PrefilterError, match="prefilter.nlist=64 IVF cells need at least as many documents"):
        build(tmp_path / "ivf", shards, kind="dense", index_type="ivf", nlist=64)


def test_skips_are_reported(tmp_path, embeddings):
    shards = write_corpus(tmp_path / "corpus")
    skips: list[Skip] = []
    update_index(tmp_path / "index", PrefilterSettings(kind="dense"), DataSettings(), shards, on_skip=skips.append)
    assert [(skip.item_id, skip.reason) for skip in skips] == [("doc-08", "whitespace-only text")]


def test_score_runs_candidates_are_the_index_top_m(tmp_path, embeddings):
    # The path a score run takes (retrieve_candidates), not only the index's own search.
    shards = write_corpus(tmp_path / "corpus", shards=2)
    settings = build(tmp_path / "out" / "prefilter" / "dense", shards, kind="dense", top_m=4)
    query = Query("q-1", "a cat on", " a mat")
    candidates = retrieve_candidates(settings, [query], shards, tmp_path / "out")
    expected = open_index(tmp_path / "out" / "prefilter" / "dense", settings, shards).top_m(["a cat on a mat"], 4)[0]
    assert [hit.doc_id for hit in candidates.hits["q-1"]] == [hit.doc_id for hit in expected]
    searched = read_manifest(tmp_path / "out" / "prefilter" / "dense").documents
    assert candidates.counts()["prefilter_searched_documents"] == searched
