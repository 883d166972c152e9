"""The gradient prefilter end to end on a tiny model: what it stores is the sketches, what it returns
is ranked by their inner product with the query's, scoring its top M = all equals the full run, it
grows shard by shard, and it refuses sketches of another model or projection."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from attribution.data.batching import batch_documents
from attribution.data.corpus import Document, iter_documents
from attribution.data.queries import read_queries
from attribution.fitting import run_fit
from attribution.prefilter.index import open_index, update_index
from attribution.prefilter.manifest import PrefilterError
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.run import run_score
from attribution.scoring.stages import Stages
from attribution.settings import (
    FactorSettings,
    ModelSettings,
    PrefilterSettings,
    ScoreSettings,
)
from attribution.sketch.basis import basis_sample, principal_directions
from attribution.sketch.footprint import index_footprint
from attribution.sketch.index import SAMPLE_FILE, DocumentSketcher
from attribution.sketch.queries import query_sketcher
from attribution.sketch.sketcher import Sketcher
from tests.prefilter.helpers import TEXTS, write_corpus
from tests.sketch.helpers import fitted_world, stored_vectors
from tests.tiny import save_tiny_lm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradient-index")
    shards, model, data, factors, queries = fitted_world(root)
    # float16 sketches: the tests below compare scores with float tolerances (coded ones have their own tests).
    prefilter = PrefilterSettings(kind="gradient", path=str(root / "index"), sketch_dim=8, sketch_bits=16, top_m=len(TEXTS))
    update_index(root / "index", prefilter, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    return root, shards, model, data, factors, queries, prefilter


def inputs(setup, **prefilter) -> ScoreInputs:
    root, _, model, data, factors, queries, settings = setup
    score = ScoreSettings(rank=None, top_k=20, query_batch_size=2, token_scores=False, progress=False)
    return ScoreInputs(model, data, factors, queries, score, prefilter=PrefilterSettings(**{**settings.__dict__, **prefilter}))


def test_the_index_stores_each_documents_sketch_and_ranks_by_the_sketched_score(setup):
    root, shards, model, data, *_ = setup
    settings = inputs(setup)
    sketcher = DocumentSketcher(model, data, settings.prefilter, Path(settings.factors.path))
    documents = list(iter_documents(shards, "id", "text", on_skip=lambda skip: None))
    expected = {}
    for batch in batch_documents(sketcher.tokenizer, documents, 3, 16, on_skip=lambda skip: None):
        expected.update(zip(batch.ids, sketcher.sketcher.documents(batch).detach().numpy()))
    index = open_index(root / "index", settings.prefilter, shards)
    query_list = read_queries(settings.queries.path, on_skip=print)
    sketches = query_sketcher(settings, root / "index", index.manifest, root)(query_list)
    hits = index.search(sketches, [q.id for q in query_list], len(TEXTS))
    for query, found in zip(query_list, hits):
        # Every document with a target (the whitespace-only one is a recorded skip), by sketched score.
        assert {hit.doc_id for hit in found} == set(expected)
        scores = np.array([hit.score for hit in found])
        exact = np.array([float(sketches[query.id] @ expected[hit.doc_id]) for hit in found])
        assert np.all(np.diff(scores) <= 0)
        # float16 storage: the scores are the float32 products to within float16's rounding.
        assert np.allclose(scores, exact, rtol=2e-3, atol=2e-3 * np.abs(exact).max())


def test_scoring_every_candidate_equals_the_full_run(setup, monkeypatch):
    """... with each query preconditioned once: the factors that sketched it are the ones scored."""
    root, _, model, data, factors, queries, prefilter = setup
    score = ScoreSettings(rank=None, top_k=20, bottom_k=2, query_batch_size=1, token_scores=False, progress=False)
    full = run_score(model, data, factors, queries, score, root / "full", {})
    batches = []
    original = Stages.query_factors
    monkeypatch.setattr(Stages, "query_factors", lambda self, batch, rank: batches.append(batch.ids) or original(self, batch, rank))
    candidates = run_score(model, data, factors, queries, score, root / "all-candidates", {}, prefilter_settings=prefilter)
    assert batches == [["q-cat"], ["q-river"]]
    assert not list((root / "all-candidates").glob(".query-factors-*"))

    def rows(summary):
        table = pq.read_table(summary.scores_path).to_pylist()
        return sorted((r["query_id"], r["direction"], r["rank"], r["doc_id"], round(r["score"], 6)) for r in table)

    assert rows(candidates) == rows(full)
    assert candidates.counts["prefilter_searched_documents"] == 11


def test_a_sketch_as_wide_as_the_modules_gives_the_influence_scores(setup):
    """score.method=prefilter writes the sketch ranking. At sketch_dim 32, wider than every module of
    the tiny model, the projections are exact, so the sketch scores are the influence scores up to
    the index's float16 rounding: a check of the whole path (whitening, rank, FAISS, merging)."""
    root, _, model, data, factors, queries, prefilter = setup
    score = ScoreSettings(rank=None, top_k=20, query_batch_size=2, token_scores=False, progress=False)
    exact = pq.read_table(run_score(model, data, factors, queries, score, root / "exact", {}).scores_path).to_pylist()
    wide = PrefilterSettings(**{**prefilter.__dict__, "path": str(root / "wide"), "sketch_dim": 32})
    update_index(root / "wide", wide, data, setup[1], on_skip=lambda skip: None, model=model, store=Path(factors.path))
    sketched = run_score(model, data, factors, queries, ScoreSettings(**{**score.__dict__, "method": "prefilter"}),
                         root / "sketched", {}, prefilter_settings=wide)
    sketched_rows = pq.read_table(sketched.scores_path).to_pylist()
    for query in ("q-cat", "q-river"):
        truth = {r["doc_id"]: r["score"] for r in exact if r["query_id"] == query and r["direction"] == "positive"}
        estimate = {r["doc_id"]: r["score"] for r in sketched_rows if r["query_id"] == query}
        common = sorted(truth)
        assert set(estimate) == set(truth), query
        assert np.allclose([estimate[d] for d in common], [truth[d] for d in common], rtol=5e-3,
                           atol=5e-3 * max(abs(v) for v in truth.values())), query


def test_a_new_shard_adds_only_its_own_files_and_searches_as_one_built_at_once(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    settings, store = PrefilterSettings(kind="gradient", sketch_dim=8, sketch_bits=16), Path(factors.path)
    update_index(tmp_path / "grown", settings, data, shards[:2], on_skip=lambda skip: None, model=model, store=store)
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "grown" / "shards").iterdir()}
    summary = update_index(tmp_path / "grown", settings, data, shards, on_skip=lambda skip: None, model=model, store=store)
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "grown" / "shards").iterdir()}
    assert summary.shards_added == 1 and {name: after[name] for name in before} == before and len(after) == len(before) + 2
    run = inputs(setup, path=str(tmp_path / "grown"))
    grown = open_index(tmp_path / "grown", settings, shards)
    at_once = open_index(root / "index", run.prefilter, shards)
    query_list = read_queries(run.queries.path, on_skip=print)
    sketches = query_sketcher(run, tmp_path / "grown", grown.manifest, root)(query_list)
    ids = [q.id for q in query_list]
    assert [[h.doc_id for h in hits] for hits in grown.search(sketches, ids, 5)] == \
        [[h.doc_id for h in hits] for hits in at_once.search(sketches, ids, 5)]


@pytest.mark.parametrize("change, field", [({"sketch_seed": 1}, "sketch_seed"), ({"sketch_dim": 4}, "sketch_dim"),
                                           ({"sketch_whiten": False}, "whitened_by")])
def test_sketches_of_another_projection_are_refused_naming_both_fingerprints(setup, change, field):
    root, *_ = setup
    run = inputs(setup, **change)
    index = open_index(root / "index", run.prefilter)
    with pytest.raises(PrefilterError, match=rf"encoder fingerprint {index.manifest.encoder_fingerprint}\) .* "
                                             rf"\(fingerprint [0-9a-f]{{32}}\): they differ in {field}"):
        query_sketcher(run, root / "index", index.manifest, root)


def test_sketches_of_another_model_are_refused(setup, tmp_path):
    root, shards, model, data, *_ = setup
    other = ModelSettings(path=str(save_tiny_lm(tmp_path / "other", TEXTS, seed=5)), device="cpu")
    update_index(tmp_path / "other-index", PrefilterSettings(kind="gradient", sketch_dim=8, sketch_whiten=False), data,
                 shards, on_skip=lambda skip: None, model=other)
    run = inputs(setup, path=str(tmp_path / "other-index"), sketch_whiten=False)
    index = open_index(tmp_path / "other-index", run.prefilter)
    with pytest.raises(PrefilterError, match="they differ in model_fingerprint"):
        query_sketcher(run, tmp_path / "other-index", index.manifest, root)


def test_a_shard_missing_from_the_index_is_an_error_naming_it(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    update_index(tmp_path / "partial", PrefilterSettings(kind="gradient", sketch_dim=8), data, shards[:2],
                 on_skip=lambda skip: None, model=model, store=Path(factors.path))
    with pytest.raises(PrefilterError, match=f"shard {shards[2]} does not match"):
        open_index(tmp_path / "partial", PrefilterSettings(kind="gradient", sketch_dim=8), shards)


def test_sketches_whitened_by_another_store_are_refused(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    refit = run_fit(model, data, FactorSettings(path=str(tmp_path / "refit"), seed=3), tmp_path, {}, progress=False)
    run = inputs(setup, path=str(root / "index"))
    run = ScoreInputs(run.model, run.data, FactorSettings(path=str(refit.factors_path)), run.queries, run.score,
                      prefilter=run.prefilter)
    index = open_index(root / "index", run.prefilter)
    with pytest.raises(PrefilterError, match="they differ in whitened_by"):
        query_sketcher(run, root / "index", index.manifest, root)


def test_whitening_without_a_store_names_the_setting(setup, tmp_path):
    root, shards, model, data, *_ = setup
    with pytest.raises(PrefilterError, match="prefilter.sketch_whiten=false"):
        update_index(tmp_path / "none", PrefilterSettings(kind="gradient"), data, shards, on_skip=lambda skip: None,
                     model=model, store=tmp_path / "no-store")


def compressed_index(setup, directory: Path, components: int, basis_documents: int) -> tuple[PrefilterSettings, dict]:
    """An index of sketch_dim 4 kept as ``components`` principal coordinates, and every document's
    whole sketch from the uncompressed sketcher, in corpus order."""
    root, shards, model, data, factors, *_ = setup
    settings = PrefilterSettings(kind="gradient", path=str(directory), sketch_dim=4, sketch_components=components,
                                 sketch_basis_documents=basis_documents, sketch_bits=16, top_m=len(TEXTS))
    update_index(directory, settings, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    return settings, whole_document_sketches(setup)


def whole_document_sketches(setup) -> dict[str, np.ndarray]:
    """Every document's whole sketch of dim 4 (float64), from the uncompressed sketcher, in corpus order."""
    root, shards, model, data, factors, *_ = setup
    whole = DocumentSketcher(model, data, PrefilterSettings(kind="gradient", sketch_dim=4), Path(factors.path))
    documents = list(iter_documents(shards, "id", "text", on_skip=lambda skip: None))
    sketches = {}
    for batch in batch_documents(whole.tokenizer, documents, 3, 16, on_skip=lambda skip: None):
        sketches.update(zip(batch.ids, whole.sketcher.documents(batch).detach().double().numpy()))
    return sketches


def sampled(setup, n: int, sketches: dict[str, np.ndarray]) -> list[str]:
    """The ids of the basis sample of ``n`` documents (sketch_seed 0) that have a sketch."""
    documents = iter_documents(setup[1], "id", "text", on_skip=lambda skip: None)
    return [doc.id for doc in basis_sample(documents, n, seed=0) if doc.id in sketches]


def whole_query_sketches(setup) -> dict[str, np.ndarray]:
    root, *_ = setup
    run = inputs(setup, path=str(root / "whole-4"), sketch_dim=4)
    update_index(root / "whole-4", run.prefilter, run.data, setup[1], on_skip=lambda skip: None, model=run.model,
                 store=Path(run.factors.path))
    index = open_index(root / "whole-4", run.prefilter)
    return query_sketcher(run, root / "whole-4", index.manifest, root)(read_queries(run.queries.path, on_skip=print))


def compressed_scores(setup, settings: PrefilterSettings) -> dict[str, dict[str, float]]:
    root, shards, *_ = setup
    run = inputs(setup, **{key: getattr(settings, key) for key in ("path", "sketch_dim", "sketch_components",
                                                                  "sketch_basis_documents", "sketch_bits", "index_type",
                                                                  "hnsw_m")})
    index = open_index(settings.path, run.prefilter, shards)
    query_list = read_queries(run.queries.path, on_skip=print)
    sketches = query_sketcher(run, Path(settings.path), index.manifest, root)(query_list)
    hits = index.search(sketches, [q.id for q in query_list], len(TEXTS))
    return {query.id: {hit.doc_id: hit.score for hit in found} for query, found in zip(query_list, hits)}


def test_principal_components_are_the_sketched_score_projected_on_the_sampled_documents_span(setup, tmp_path):
    """With a basis from 6 sampled documents, 4 components per module: each score is
    ``s(q)^T V V^T s(z)`` with ``V V^T`` the projector on the top 4 eigenvectors of the sampled
    documents' second moment ``sum s s^T`` of each module (numpy, from the whole sketches)."""
    settings, sketches = compressed_index(setup, tmp_path / "pc", components=4, basis_documents=6)
    queries = whole_query_sketches(setup)
    chosen = sampled(setup, 6, sketches)
    sample = np.stack([sketches[doc] for doc in chosen]).reshape(len(chosen), -1, 16)
    projectors = []
    for module in range(sample.shape[1]):
        _, vectors = np.linalg.eigh(sample[:, module].T @ sample[:, module])
        projectors.append(vectors[:, -4:] @ vectors[:, -4:].T)
    found = compressed_scores(setup, settings)
    for query, scores in found.items():
        assert set(scores) == set(sketches)
        q = queries[query].astype(np.float64).reshape(-1, 16)
        expected = {doc: sum(q[m] @ projectors[m] @ z.reshape(-1, 16)[m] for m in range(len(projectors)))
                    for doc, z in sketches.items()}
        scale = max(abs(v) for v in expected.values())
        assert max(abs(scores[doc] - expected[doc]) for doc in scores) < 3e-3 * scale, query
        whole = {doc: float(queries[query] @ z) for doc, z in sketches.items()}
        # Not the whole sketched score: the basis drops part of it.
        assert max(abs(whole[doc] - expected[doc]) for doc in scores) > 0.05 * scale


def test_as_many_components_as_documents_keep_every_sketched_score(setup, tmp_path):
    """Every document's sketch lies in the span of the 11 sketched documents: nothing is dropped."""
    settings, sketches = compressed_index(setup, tmp_path / "pc", components=len(TEXTS) - 1, basis_documents=len(TEXTS))
    queries = whole_query_sketches(setup)
    for query, scores in compressed_scores(setup, settings).items():
        whole = {doc: float(queries[query] @ z) for doc, z in sketches.items()}
        scale = max(abs(v) for v in whole.values())
        assert max(abs(scores[doc] - whole[doc]) for doc in scores) < 3e-3 * scale, query


def test_a_compressed_index_grows_with_its_own_basis_and_refuses_another(setup, tmp_path):
    """Shards added later are stored in the basis fitted when the index was created: every score is
    ``s(q)^T V V^T s(z)`` with V read from its file, whichever shard z is in."""
    root, shards, model, data, factors, *_ = setup
    settings = PrefilterSettings(kind="gradient", path=str(tmp_path / "grown"), sketch_dim=4, sketch_components=3,
                                 sketch_basis_documents=4, sketch_bits=16)
    store = Path(factors.path)
    update_index(tmp_path / "grown", settings, data, shards[:1], on_skip=lambda skip: None, model=model, store=store)
    basis = (tmp_path / "grown" / "basis.safetensors").read_bytes()
    update_index(tmp_path / "grown", settings, data, shards, on_skip=lambda skip: None, model=model, store=store)
    assert (tmp_path / "grown" / "basis.safetensors").read_bytes() == basis
    stored = load_file(str(tmp_path / "grown" / "basis.safetensors"))
    modules = json.loads((tmp_path / "grown" / "manifest.json").read_text())["encoder"]["modules"]
    directions = [stored[name].double().numpy() for name in modules]
    sketches, queries = whole_document_sketches(setup), whole_query_sketches(setup)
    for query, scores in compressed_scores(setup, settings).items():
        assert set(scores) == set(sketches)
        q = queries[query].astype(np.float64).reshape(-1, 16)
        expected = {doc: sum(q[m] @ v @ v.T @ z.reshape(-1, 16)[m] for m, v in enumerate(directions))
                    for doc, z in sketches.items()}
        scale = max(abs(value) for value in expected.values())
        assert max(abs(scores[doc] - expected[doc]) for doc in scores) < 3e-3 * scale, query
    with pytest.raises(PrefilterError, match="they differ in sketch_components"):
        compressed_scores(setup, PrefilterSettings(**{**settings.__dict__, "sketch_components": 2}))
    with pytest.raises(PrefilterError, match="was built with another encoder"):
        update_index(tmp_path / "grown", PrefilterSettings(kind="gradient", sketch_dim=4), data, shards,
                     on_skip=lambda skip: None, model=model, store=store)
    (tmp_path / "grown" / "basis.safetensors").unlink()
    with pytest.raises(PrefilterError, match="they differ in basis_sha256"):
        compressed_scores(setup, settings)


def test_a_basis_sample_smaller_than_the_components_keeps_what_it_spans(setup, tmp_path):
    """Three sampled documents span three directions per module (fewer if one has no sketch): the basis
    keeps those, and the sampled documents' scores whole."""
    settings, sketches = compressed_index(setup, tmp_path / "few", components=5, basis_documents=3)
    chosen = sampled(setup, 3, sketches)
    assert {tuple(matrix.shape) for matrix in load_file(str(tmp_path / "few" / "basis.safetensors")).values()} == \
        {(16, len(chosen))}
    queries = whole_query_sketches(setup)
    for query, scores in compressed_scores(setup, settings).items():
        for doc in chosen:
            whole = float(queries[query] @ sketches[doc])
            assert scores[doc] == pytest.approx(whole, rel=3e-3, abs=3e-3 * max(abs(v) for v in scores.values()))


def test_as_many_components_as_the_sketch_has_store_the_whole_sketch(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    for components in (16, None):
        directory = tmp_path / f"whole-{components}"
        settings = PrefilterSettings(kind="gradient", sketch_dim=4, sketch_components=components, sketch_bits=16)
        update_index(directory, settings, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
        assert not (directory / "basis.safetensors").exists()
        assert "sketch_components" not in json.loads((directory / "manifest.json").read_text())["encoder"]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("whole-16", "whole-None")]
    assert manifests[0]["encoder_fingerprint"] == manifests[1]["encoder_fingerprint"]


@pytest.mark.parametrize("shape", [(30, 16), (10, 16)])
def test_principal_directions_are_the_top_right_singular_vectors(shape):
    """Both routes (covariance when documents outnumber the sketch's numbers, Gram matrix when not)
    span the SVD's top directions, orthonormal."""
    sketches = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sketches[:, 0] *= 5
    basis = principal_directions(sketches, 6)
    right = torch.linalg.svd(sketches, full_matrices=False)[2][:6].T
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(basis @ basis.T, right @ right.T, atol=1e-10)


def test_the_basis_sample_is_sketched_once(setup, tmp_path, monkeypatch):
    root, shards, model, data, factors, *_ = setup
    sketched = []
    documents = Sketcher.documents

    def counting(self, batch):
        sketched.extend(batch.ids)
        return documents(self, batch)

    monkeypatch.setattr(Sketcher, "documents", counting)
    settings = PrefilterSettings(kind="gradient", sketch_dim=4, sketch_components=3, sketch_basis_documents=6)
    update_index(tmp_path / "once", settings, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    assert sorted(sketched) == sorted({doc.id for doc in iter_documents(shards, "id", "text", on_skip=lambda skip: None)
                                       if doc.text.strip()})


def test_the_basis_sample_is_uniform_over_the_corpus():
    """Each of 20 documents is drawn with probability 5/20 (reservoir sampling): over 4,000 seeds every
    document's count is 1,000 within 5 standard deviations, the first five's included."""
    documents = [Document(id=f"doc-{i:02d}", text="x", shard="s", row=i) for i in range(20)]
    counts = {doc.id: 0 for doc in documents}
    for seed in range(4000):
        drawn = basis_sample(documents, 5, seed)
        assert len({doc.id for doc in drawn}) == 5
        for doc in drawn:
            counts[doc.id] += 1
    spread = (4000 * 0.25 * 0.75) ** 0.5
    assert all(abs(count - 1000) < 5 * spread for count in counts.values()), counts
    assert basis_sample(documents, 30, 0) == documents


def coded_index(setup, directory: Path, bits: int, **settings) -> PrefilterSettings:
    root, shards, model, data, factors, *_ = setup
    prefilter = PrefilterSettings(kind="gradient", path=str(directory), sketch_dim=4, sketch_components=None,
                                  sketch_bits=bits, sketch_basis_documents=len(TEXTS), top_m=len(TEXTS), **settings)
    update_index(directory, prefilter, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    return prefilter


@pytest.mark.parametrize("bits", [8, 4])
def test_coded_sketches_are_each_coordinate_on_its_sampled_range(setup, tmp_path, bits):
    """With every document in the sample, coordinate j's range is [min_j, max_j] over the documents'
    whole sketches, and a stored coordinate decodes to ``lo + (floor((2^b - 1) t) + 1/2) (hi - lo) / (2^b - 1)``
    for ``t = (x - lo) / (hi - lo)`` (numpy); the search scores are the query's inner product with them."""
    settings = coded_index(setup, tmp_path / f"coded-{bits}", bits)
    sketches = whole_document_sketches(setup)
    whole = np.stack(list(sketches.values()))
    low, high = whole.min(0), whole.max(0)
    levels = 2**bits - 1
    codes = np.floor(levels * np.clip((whole - low) / (high - low), 0, 1))
    expected = low + (np.minimum(codes, levels) + 0.5) * (high - low) / levels
    decoded = stored_vectors(tmp_path / f"coded-{bits}")
    stored = np.stack([decoded[doc] for doc in sketches])
    step = (high - low) / levels
    # float32 rounding may put a coordinate on a code boundary: then the codes differ by one.
    assert np.all(np.abs(stored - expected) <= step * (1 + 1e-4) + 1e-9)
    assert np.mean(np.abs(stored - expected) <= 1e-4 * step + 1e-9) > 0.99
    assert np.max(np.abs(stored - whole)) > 0.1 * step.max()
    queries = whole_query_sketches(setup)
    found = compressed_scores(setup, settings)
    for query, scores in found.items():
        assert set(scores) == set(sketches)
        for doc, score in scores.items():
            tolerance = 1e-4 * float(np.abs(queries[query]).sum())
            assert score == pytest.approx(float(queries[query] @ decoded[doc]), rel=1e-4, abs=tolerance)


def test_a_coded_index_grows_with_its_own_codes_and_refuses_other_bits(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    store = Path(factors.path)
    settings = PrefilterSettings(kind="gradient", path=str(tmp_path / "grown"), sketch_dim=4, sketch_components=8,
                                 sketch_bits=8, sketch_basis_documents=5)
    update_index(tmp_path / "grown", settings, data, shards[:1], on_skip=lambda skip: None, model=model, store=store)
    codebook = (tmp_path / "grown" / "codebook.faiss").read_bytes()
    update_index(tmp_path / "grown", settings, data, shards, on_skip=lambda skip: None, model=model, store=store)
    assert (tmp_path / "grown" / "codebook.faiss").read_bytes() == codebook
    encoder = json.loads((tmp_path / "grown" / "manifest.json").read_text())["encoder"]
    assert encoder["sketch_bits"] == 8 and len(encoder["codebook_sha256"]) == 64
    assert len(compressed_scores(setup, settings)["q-cat"]) == len(whole_document_sketches(setup))
    with pytest.raises(PrefilterError, match="they differ in stored, sketch_bits"):
        compressed_scores(setup, PrefilterSettings(**{**settings.__dict__, "sketch_bits": 4}))
    (tmp_path / "grown" / "codebook.faiss").unlink()
    with pytest.raises(PrefilterError, match="they differ in codebook_sha256"):
        compressed_scores(setup, settings)


def test_float16_sketches_keep_the_encoder_fingerprint_of_an_index_without_codes(setup, tmp_path):
    root, shards, model, data, factors, *_ = setup
    settings = PrefilterSettings(kind="gradient", sketch_dim=4, sketch_components=None, sketch_bits=16)
    update_index(tmp_path / "plain", settings, data, shards, on_skip=lambda skip: None, model=model, store=Path(factors.path))
    assert not (tmp_path / "plain" / "codebook.faiss").exists()
    encoder = json.loads((tmp_path / "plain" / "manifest.json").read_text())["encoder"]
    assert "sketch_bits" not in encoder and "codebook_sha256" not in encoder and encoder["stored"] == "float16"


def test_the_footprint_is_what_the_build_writes(setup, tmp_path, monkeypatch):
    """Stored bytes a document (FAISS's code size), the basis file and the temporary sample file, as
    :func:`index_footprint` predicts from the settings (files up to their headers)."""
    root, shards, model, data, factors, *_ = setup
    settings = PrefilterSettings(kind="gradient", sketch_dim=4, sketch_components=6, sketch_bits=4, sketch_basis_documents=50)
    corpus = len(list(iter_documents(shards, "id", "text", on_skip=lambda skip: None)))
    sample_sizes = []
    fit = DocumentSketcher._fit_basis

    def measuring(self, directory, sample):
        sample_sizes.append((directory / SAMPLE_FILE).stat().st_size)
        return fit(self, directory, sample)

    monkeypatch.setattr(DocumentSketcher, "_fit_basis", measuring)
    summary = update_index(tmp_path / "sized", settings, data, shards, on_skip=lambda skip: None, model=model,
                           store=Path(factors.path))
    modules = len(json.loads((tmp_path / "sized" / "manifest.json").read_text())["encoder"]["modules"])
    footprint = index_footprint(settings, modules, corpus)
    assert footprint.document_bytes == modules * 3 == summary.document_bytes
    assert f", {modules * 3} bytes each" in summary.line()
    shard = json.loads((tmp_path / "sized" / "manifest.json").read_text())["shards"][0]["stem"]
    assert faiss.read_index(str(tmp_path / "sized" / f"{shard}.faiss")).code_size == footprint.document_bytes
    basis_file = (tmp_path / "sized" / "basis.safetensors").stat().st_size
    assert 0 < basis_file - footprint.basis_bytes < 2048
    assert 0 < sample_sizes[0] - footprint.sample_file_bytes <= 128
    assert not (tmp_path / "sized" / SAMPLE_FILE).exists()
    assert footprint.kept_sample_bytes == corpus * modules * 6 * 4 and footprint.fit_bytes == 8 * (corpus * 16 + 16**2)


def test_an_hnsw_graph_over_codes_finds_every_document_with_its_decoded_score(setup, tmp_path):
    settings = coded_index(setup, tmp_path / "graph", 8, index_type="hnsw", hnsw_m=4)
    decoded = stored_vectors(tmp_path / "graph")
    queries = whole_query_sketches(setup)
    for query, scores in compressed_scores(setup, settings).items():
        assert set(scores) == set(whole_document_sketches(setup))
        for doc, score in scores.items():
            tolerance = 1e-4 * float(np.abs(queries[query]).sum())
            assert score == pytest.approx(float(queries[query] @ decoded[doc]), rel=1e-4, abs=tolerance)


@pytest.mark.parametrize("components", [3, None])
def test_a_corpus_without_a_prediction_target_has_no_sample_to_fit_on(setup, tmp_path, components):
    root, shards, model, data, factors, *_ = setup
    blank = write_corpus(tmp_path / "blank", ["   ", "  "], shards=1)
    settings = PrefilterSettings(kind="gradient", sketch_dim=4, sketch_components=components, sketch_bits=4)
    with pytest.raises(PrefilterError, match="the shards the index is created over have none"):
        update_index(tmp_path / "index", settings, data, blank, on_skip=lambda skip: None, model=model, store=Path(factors.path))
