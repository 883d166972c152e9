"""``run_score`` with ``refine.method``: scores against a dense solve on the refinement sample, what the run
record keeps per query, and each bad input as the user meets it."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import load_factors
from attribution.data.batching import batch_documents, batch_queries
from attribution.data.corpus import list_shards
from attribution.data.queries import read_queries
from attribution.data.stream import training_batches
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine import inverse as refine_inverse
from attribution.refine.inverse import StageInverse
from attribution.scoring.query_factors import per_sequence_gradients
from attribution.scoring.run import run_score
from attribution.settings import (
    DataSettings,
    FactorSettings,
    ModelSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm

QUERIES = [{"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat"},
           {"id": "q-dog", "prompt": "dogs ran in", "completion": " parks"}]


def fitted_tiny(root, queries: list[dict], batch_size: int):
    """A float64 tiny model, a 10-document corpus in two shards, ``queries`` and an EK-FAC store damped by 0.05:
    ``(root, model, data, factors, queries)`` settings."""
    rows = corpus_rows(10)
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:5], rows[5:]])
    query_file = root / "queries.jsonl"
    query_file.write_text("".join(json.dumps(r) + "\n" for r in queries))
    model = ModelSettings(path=str(model_dir), device="cpu", dtype="float64")
    data = DataSettings(path=corpus, max_length=16, batch_size=batch_size)
    fit = run_fit(model, data, FactorSettings(path=str(root / "factors"), damping=0.05), root / "fit", {}, progress=False)
    factors = FactorSettings(path=str(fit.factors_path), damping=0.05)
    return root, model, data, factors, QuerySettings(path=str(query_file))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fitted_tiny(tmp_path_factory.mktemp("refined"), QUERIES, batch_size=4)


def score(setup, name, refine, strategy="ekfac"):
    root, model, data, factors, queries = setup
    return run_score(model, data, replace(factors, strategy=strategy), queries,
                     ScoreSettings(rank=None, top_k=10, token_scores=False, progress=False, dtype="float64"), root / name, {},
                     refine_settings=refine)


def dense_scores(setup, max_sequences: int, sample_length: int | None = None) -> dict[tuple[str, str], float]:
    """``g_q^T (G + D)^{-1} g_z`` with the explicit G of the first ``max_sequences`` documents of the store's data
    (cut to their first ``sample_length`` tokens)."""
    root, model_settings, data, factors, queries = setup
    model, tokenizer = load_model(model_settings.path, False, torch.float64, "cpu")
    tracked = find_tracked_modules(model)
    layout = ParameterLayout(tracked)
    preconditioner = Preconditioner(load_factors(factors.path, tracked, model_fingerprint(model)), factors.damping)
    sample_data = replace(data, max_length=sample_length or data.max_length)
    sample = list(training_batches(tokenizer, list_shards(data.path), sample_data, lambda skip: None, max_sequences))
    matrix = dense_gauss_newton(GaussNewton(model, tracked, sample)) + torch.diag(preconditioner.damping_vector(layout))
    [query_batch] = batch_queries(tokenizer, read_queries(queries.path, lambda skip: None), 8, 16, lambda skip: None)
    gradients = layout.join(per_sequence_gradients(model, tracked, query_batch))
    solved = torch.linalg.solve(matrix, gradients.T).T
    documents = [doc for shard in list_shards(data.path) for doc in _documents(shard)]
    scores = {}
    for batch in batch_documents(tokenizer, documents, 4, 16, lambda skip: None):
        candidate = layout.join(per_sequence_gradients(model, tracked, batch))
        for q, query_id in enumerate(query_batch.ids):
            for d, doc_id in enumerate(batch.ids):
                scores[(query_id, doc_id)] = float(solved[q] @ candidate[d])
    return scores


def _documents(shard):
    from attribution.data.corpus import iter_documents

    return list(iter_documents([shard], on_skip=lambda skip: None))


@pytest.mark.parametrize("columns", [8, 1])
def test_refined_scores_equal_the_dense_solve_and_the_record_says_how(setup, columns):
    """Both queries solved together, and (``refine.columns=1``) one after the other."""
    refine = RefineSettings(method="cg", steps=200, tolerance=1e-10, max_sequences=6, columns=columns)
    summary = score(setup, f"cg-{columns}", refine)
    table = pq.read_table(summary.scores_path).to_pylist()
    expected = dense_scores(setup, 6)
    assert len(table) == 2 * 10
    for row in table:
        assert row["score"] == pytest.approx(expected[(row["query_id"], row["doc_id"])], rel=1e-6, abs=1e-9)
    record = json.loads(summary.run_record.read_text())["config"]
    assert set(record["query_diagnostics"]) == {"q-cat", "q-dog"}
    for [diagnostic] in record["query_diagnostics"].values():
        assert diagnostic["stage"] == "model" and diagnostic["method"] == "cg" and diagnostic["status"] == "converged"
        assert 0 < diagnostic["gauss_newton_products"] <= 200 and diagnostic["relative_residual"] <= 1e-10
        assert diagnostic["fallback"] is None
    assert record["refinement"]["model"]["sequences"] == 6
    assert record["refinement"]["model"]["path"] == setup[2].path  # the store's fit data, by default


def test_a_shorter_refinement_sample_solves_on_the_documents_first_tokens(setup):
    """``refine.max_length``: the Gauss-Newton matrix of the sample's documents cut to 6 tokens (the store's
    data has 16), which is another matrix, so another score and another run key."""
    refine = RefineSettings(method="cg", steps=200, tolerance=1e-10, max_sequences=6, max_length=6)
    summary = score(setup, "cg-short", refine)
    short, full = dense_scores(setup, 6, sample_length=6), dense_scores(setup, 6)
    scale = max(abs(value) for value in short.values())
    for row in pq.read_table(summary.scores_path).to_pylist():
        assert row["score"] == pytest.approx(short[(row["query_id"], row["doc_id"])], rel=1e-6, abs=1e-6 * scale)
    assert max(abs(short[key] - full[key]) / abs(full[key]) for key in full) > 1e-3
    assert json.loads(summary.run_record.read_text())["config"]["refinement"]["model"]["max_length"] == 6
    assert refine.scoring_settings() != replace(refine, max_length=None).scoring_settings()


def test_closed_form_differs_from_the_refined_solve(setup):
    """The comparison above could not pass by accident: the closed form gives other scores."""
    summary = score(setup, "none", RefineSettings())
    expected = dense_scores(setup, 6)
    errors = [abs(row["score"] - expected[(row["query_id"], row["doc_id"])]) / abs(expected[(row["query_id"], row["doc_id"])])
              for row in pq.read_table(summary.scores_path).to_pylist()]
    assert max(errors) > 1e-2


def test_bad_refinement_inputs(setup, tmp_path):
    with pytest.raises(SettingsError, match="refine.data_path=/nowhere: no such"):
        RefineSettings(method="cg", data_path="/nowhere")
    with pytest.raises(SettingsError, match="refine.steps=0"):
        RefineSettings(method="cg", steps=0)
    with pytest.raises(SettingsError, match="refine.method='lbfgs'"):
        RefineSettings(method="lbfgs")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"id": f"b{i}", "text": ""}) + "\n" for i in range(3)))
    with pytest.raises(SettingsError, match=r"refine.data_path=.*blank.jsonl: no usable document"):
        score(setup, "blank", RefineSettings(method="cg", data_path=str(blank)))
    with pytest.raises(SettingsError, match="needs a fitted factor store"):
        score(setup, "identity", RefineSettings(method="cg"), strategy="identity")


def test_a_diverging_solve_falls_back_to_the_closed_form_and_says_so(setup, monkeypatch):
    root, model_settings, data, factors, queries = setup
    model, tokenizer = load_model(model_settings.path, False, torch.float64, "cpu")
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(load_factors(factors.path, tracked, model_fingerprint(model)), factors.damping)
    sample = list(training_batches(tokenizer, list_shards(data.path), data, lambda skip: None, 4))

    class Broken:
        """A Gauss-Newton product that returns NaN, as an overflowing model would."""

        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, vectors):
            return torch.full(vectors.shape, float("nan"), dtype=torch.float64)

    monkeypatch.setattr(refine_inverse, "GaussNewton", Broken)
    inverse = StageInverse("model", model, tracked, preconditioner, RefineSettings(method="cg", steps=5), sample)
    [query_batch] = batch_queries(tokenizer, read_queries(queries.path, lambda skip: None), 8, 16, lambda skip: None)
    gradients = inverse.layout.join(per_sequence_gradients(model, tracked, query_batch))
    solution, diagnostics = inverse(gradients, query_batch.ids)
    torch.testing.assert_close(solution, inverse.closed_form(gradients))
    assert all(d["status"] == "diverged" and d["fallback"].startswith("closed form (the solve diverged") for d in diagnostics)


@pytest.mark.parametrize("learning_rate", [1e4, None])
def test_a_stochastic_iteration_never_ends_worse_than_the_closed_form(setup, learning_rate):
    """Too long a step, set by the user, runs away and falls back; the estimated step, shortened when
    needed, ends closer to the solution than the closed form in the A-norm the solve minimises."""
    root, model_settings, data, factors, queries = setup
    model, tokenizer = load_model(model_settings.path, False, torch.float64, "cpu")
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(load_factors(factors.path, tracked, model_fingerprint(model)), factors.damping)
    sample = list(training_batches(tokenizer, list_shards(data.path), data, lambda skip: None, 2))
    settings = RefineSettings(method="stochastic", steps=30, batch_size=2, learning_rate=learning_rate)
    inverse = StageInverse("model", model, tracked, preconditioner, settings, sample)
    [query_batch] = batch_queries(tokenizer, read_queries(queries.path, lambda skip: None), 8, 16, lambda skip: None)
    gradients = inverse.layout.join(per_sequence_gradients(model, tracked, query_batch))
    solution, diagnostics = inverse(gradients, query_batch.ids)
    matrix = dense_gauss_newton(GaussNewton(model, tracked, sample)) + torch.diag(inverse.damping.to(torch.float64))
    exact = torch.linalg.solve(matrix, gradients.to(torch.float64).T).T

    def distance(x):  # ||x - x*||_A, per query
        error = x - exact
        return ((error @ matrix) * error).sum(1).sqrt()

    closed = inverse.closed_form(gradients).to(torch.float64)
    solution = solution.to(torch.float64)
    if learning_rate is not None:
        assert all(d["fallback"] for d in diagnostics)
        torch.testing.assert_close(solution, closed)
    else:
        assert not any(d["fallback"] for d in diagnostics)
        assert bool((distance(solution) < distance(closed)).all())


def test_the_settings_that_bound_memory_leave_the_run_key_alone():
    """A run planned by ``model.memory_gib`` (fewer columns, kept graphs or CG batches) is the same run; the
    stochastic iteration's batch is its mini-batch, which changes the scores."""
    cg = RefineSettings(method="cg")
    assert cg.scoring_settings() == RefineSettings(method="cg", columns=1, cached_sequences=0, batch_size=1).scoring_settings()
    assert cg.scoring_settings() != RefineSettings(method="cg", steps=3).scoring_settings()
    stochastic = RefineSettings(method="stochastic")
    assert stochastic.scoring_settings() != RefineSettings(method="stochastic", batch_size=1).scoring_settings()
