"""Top-k, bottom-k and all-pairs tables of whole runs against brute force and a full sort, with ties,
across shard layouts, batch sizes, passes and k."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import load_factors
from attribution.data.batching import batch_documents, batch_queries
from attribution.data.corpus import Document, list_shards
from attribution.data.queries import read_queries
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.scoring.run import run_score
from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings
from tests.scoring.test_engine import autograd_gradient
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm

QUERY_ROWS = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat"},
    {"id": "q-dog", "prompt": "dogs ran in", "completion": " parks"},
    {"id": "q-bird", "prompt": "birds sang over", "completion": " hills and rivers"},
    {"id": "q-river", "prompt": "near rivers", "completion": " and hills"},
    {"id": "q-mat", "prompt": "a mat while", "completion": " dogs ran"},
]


def documents() -> list[dict]:
    """Twelve documents, three of them repeated under other ids: exact ties when scored alone."""
    rows = corpus_rows(12)
    return rows + [{"id": f"copy-of-{r['id']}", "text": r["text"]} for r in rows[2:5]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    rows = documents()
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:6], rows[6:]])
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in QUERY_ROWS))
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=corpus, max_length=16, batch_size=1)
    fit = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    return root, rows, model, data, FactorSettings(path=str(fit.factors_path)), QuerySettings(path=str(queries))


def brute_force(setup) -> dict[tuple[str, str], float]:
    """I(q, z) = sum_m <(G_m + lambda I)^{-1} g_q, g_z>, every gradient by plain autograd, alone, in float64."""
    root, rows, model_settings, data, factors, queries = setup
    model, tokenizer = load_model(model_settings.path, False, torch.float32, torch.device("cpu"))
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(load_factors(factors.path, tracked, model_fingerprint(model)))
    model = model.to(torch.float64)
    ignore = lambda skip: None  # noqa: E731
    preconditioned = {}
    for query in read_queries(queries.path, on_skip=ignore):
        (batch,) = batch_queries(tokenizer, [query], 1, data.max_length, ignore)
        gradient = autograd_gradient(model, tracked, batch)
        preconditioned[query.id] = {name: preconditioner.apply(name, g) for name, g in gradient.items()}
    scores = {}
    for row in rows:
        (batch,) = batch_documents(tokenizer, [Document(row["id"], row["text"], "s", 0)], 1, data.max_length, ignore)
        gradient = autograd_gradient(model, tracked, batch)
        for query_id, p in preconditioned.items():
            scores[(query_id, row["id"])] = float(sum((p[name] * g).sum() for name, g in gradient.items()))
    return scores


def run(setup, name, data=None, **overrides):
    root, _, model, default_data, factors, queries = setup
    settings = ScoreSettings(**{"rank": None, "query_batch_size": 2, "token_scores": False, "progress": False, **overrides})
    return run_score(model, data or default_data, factors, queries, settings, root / name, {})


def pairs_of(summary) -> list[dict]:
    return pq.read_table(summary.scores_path).to_pylist()


def full_sort(pairs: list[dict], shards: list[str], k: int, largest: bool) -> dict[str, list[str]]:
    """Per query, the first k documents of a full sort by score, ties by (shard index, row)."""
    position = {shard: index for index, shard in enumerate(shards)}
    by_query: dict[str, list[dict]] = {}
    for pair in pairs:
        by_query.setdefault(pair["query_id"], []).append(pair)
    return {
        query_id: [p["doc_id"] for p in sorted(group, key=lambda p: (-p["score"] if largest else p["score"],
                                                                      position[p["shard"]], p["row"]))[:k]]
        for query_id, group in by_query.items()
    }


def ranked(summary, direction: str) -> dict[str, list[str]]:
    rows = pq.read_table(summary.scores_path, filters=[("direction", "=", direction)]).to_pylist()
    result: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        result.setdefault(row["query_id"], []).append((row["rank"], row["doc_id"]))
    for query_id, entries in result.items():
        assert [rank for rank, _ in sorted(entries)] == list(range(1, len(entries) + 1))
    return {query_id: [doc for _, doc in sorted(entries)] for query_id, entries in result.items()}


def test_all_pairs_equal_brute_force_and_ties_are_exact(setup):
    expected = brute_force(setup)
    summary = run(setup, "pairs", top_k="all")
    pairs = pairs_of(summary)
    assert summary.all_pairs and summary.counts["pairs_scored"] == len(pairs) == len(expected) == 5 * 15
    assert summary.scores_path.name.startswith("run_id=") and summary.top == {}
    assert {(p["query_id"], p["doc_id"]) for p in pairs} == set(expected)
    scale = max(abs(v) for v in expected.values())
    for pair in pairs:
        assert pair["score"] == pytest.approx(expected[(pair["query_id"], pair["doc_id"])], abs=1e-4 * scale)
        assert pair["score"] == pytest.approx(sum(pair["layer_scores"]), rel=1e-5, abs=1e-9 * scale)
    score_of = {(p["query_id"], p["doc_id"]): p["score"] for p in pairs}
    assert score_of[("q-cat", "doc-02")] == score_of[("q-cat", "copy-of-doc-02")], "copies scored alone must tie exactly"
    # The dataset reads as one table with its partitions (run and query batch).
    dataset = pq.read_table(summary.scores_path.parent)
    assert dataset.num_rows == len(pairs) and {"run_id", "query_batch"} <= set(dataset.column_names)
    assert sorted(set(dataset["query_batch"].to_pylist())) == [0, 1, 2]


@pytest.mark.parametrize("variant", [
    {"name": "layout-a", "shards": [[0, 6], [6, 15]], "batch_size": 1, "per_pass": 1, "top_k": 4, "bottom_k": 3},
    {"name": "layout-b", "shards": [[9, 15], [0, 3], [3, 9]], "batch_size": 4, "per_pass": 2, "top_k": 15, "bottom_k": 1},
    {"name": "one-shard", "shards": [[0, 15]], "batch_size": 3, "per_pass": 3, "top_k": 1, "bottom_k": 20},
])
def test_top_and_bottom_k_equal_a_full_sort(setup, tmp_path, variant):
    root, rows, *_ = setup
    corpus = write_shards(tmp_path / "corpus", [rows[a:b] for a, b in variant["shards"]])
    data = DataSettings(path=corpus, max_length=16, batch_size=variant["batch_size"])
    common = {"query_batches_per_pass": variant["per_pass"]}
    pairs = pairs_of(run(setup, f"{variant['name']}-pairs", data, top_k="all", **common))
    summary = run(setup, variant["name"], data, top_k=variant["top_k"], bottom_k=variant["bottom_k"], **common)
    shards = [str(s) for s in list_shards(corpus)]
    assert ranked(summary, "positive") == full_sort(pairs, shards, variant["top_k"], largest=True)
    assert ranked(summary, "negative") == full_sort(pairs, shards, variant["bottom_k"], largest=False)
    score_of = {(p["query_id"], p["doc_id"]): p["score"] for p in pairs}
    for row in pq.read_table(summary.scores_path).to_pylist():
        assert row["score"] == score_of[(row["query_id"], row["doc_id"])]
    expected = brute_force(setup)
    scale = max(abs(v) for v in expected.values())
    assert all(abs(score_of[key] - value) <= 1e-4 * scale for key, value in expected.items())
    counts = summary.counts
    assert counts["documents_scored"] == 15 and counts["pairs_scored"] == 75 and counts["queries_scored"] == 5
    assert counts["passes"] == -(-3 // variant["per_pass"]) and counts["document_passes"] == 15 * counts["passes"]


def test_ties_break_by_shard_then_row(setup):
    """Exact ties (copies, scored alone) rank in corpus order: the copy in the later shard comes second."""
    summary = run(setup, "ties", top_k=15)
    for query_id, documents in ranked(summary, "positive").items():
        for original in ("doc-02", "doc-03", "doc-04"):
            assert documents.index(original) + 1 == documents.index(f"copy-of-{original}"), (query_id, documents)


def test_without_layer_scores(setup):
    pairs = run(setup, "no-layers-pairs", top_k="all", layer_scores=False)
    assert "layer_scores" not in pq.read_table(pairs.scores_path).column_names
    table = pq.read_table(run(setup, "no-layers", top_k=3, layer_scores=False).scores_path)
    assert table.num_rows == 15 and all(layers == [] for layers in table["layer_scores"].to_pylist())


def test_the_work_directory_is_cleared_but_the_run_is_found_again(setup):
    first = run(setup, "again", top_k=2)
    work = list((setup[0] / "again" / ".work").iterdir())
    assert len(work) == 1 and sorted(p.name for p in work[0].iterdir()) == ["complete.json"]
    again = run(setup, "again", top_k=2)
    assert again.reused and again.run_id == first.run_id
    assert np.array_equal(pq.read_table(again.scores_path)["score"].to_numpy(), pq.read_table(first.scores_path)["score"].to_numpy())


def test_query_diagnostics_reach_the_run_record(setup, monkeypatch):
    from attribution.scoring.stages import QueryBatchFactors, Stages

    original = Stages.query_factors

    def with_diagnostics(self, batch, rank):
        prepared = original(self, batch, rank)
        return QueryBatchFactors(prepared.factors, prepared.rejected,
                                 [{"query_id": query_id, "residual": 0.5, "products": position}
                                  for position, query_id in enumerate(batch.ids)])

    monkeypatch.setattr(Stages, "query_factors", with_diagnostics)
    summary = run(setup, "diagnostics", top_k=2)
    diagnostics = json.loads(summary.run_record.read_text())["config"]["query_diagnostics"]
    expected = {"q-cat": 0, "q-dog": 1, "q-bird": 0, "q-river": 1, "q-mat": 0}
    assert diagnostics == {query_id: [{"query_id": query_id, "residual": 0.5, "products": products}]
                           for query_id, products in expected.items()}
