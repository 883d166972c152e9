"""The exact block-diagonal method against a dense solve with the module-diagonal blocks of the explicit G."""

from __future__ import annotations

import torch

from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton, use_eager_attention
from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import batch_queries
from attribution.data.corpus import Document
from attribution.data.queries import Query
from attribution.evaluation.config import GroundTruthSpec, MethodSpec
from attribution.evaluation.methods import block_diagonal_solve
from attribution.evaluation.problem import Problem, Stage
from attribution.models import find_tracked_modules, load_model
from tests.tiny import save_tiny_lm

TEXTS = ["anna was born in paris .", "boris plays the cello in rome .", "the weather was cold that day .",
         "clara works for acme in oslo .", "paris has a river ."]


def test_block_diagonal_solve_equals_dense_block_solve(tmp_path):
    model, tokenizer = load_model(str(save_tiny_lm(tmp_path / "model", TEXTS)), False, torch.float64, "cpu")
    use_eager_attention(model)
    tracked = find_tracked_modules(model)
    documents = [Document(f"d{i}", text, "corpus.jsonl", i) for i, text in enumerate(TEXTS)]
    queries = [Query("q0", "anna was born in", " paris"), Query("q1", "clara works for", " acme")]
    [query_batch] = batch_queries(tokenizer, queries, 2, 16, lambda skip: None)
    problem = Problem([Stage("model", model, tokenizer, tracked, documents, 16, "test")], query_batch)
    layout = ParameterLayout(tracked)
    matrix = dense_gauss_newton(GaussNewton(model, tracked, problem.fit_batches(2)), chunk=512)
    damping = 0.3 * float(torch.diagonal(matrix).mean())

    solution, iterations, residual = block_diagonal_solve(problem, MethodSpec("block", "block_exact"), damping,
                                                          GroundTruthSpec(tolerance=1e-10, max_iterations=2000), batch_size=2)

    gradients = problem.query_vectors(tracked)
    bounds = torch.tensor([0, *layout.sizes]).cumsum(0).tolist()
    blocks = torch.zeros_like(matrix)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        blocks[start:stop, start:stop] = matrix[start:stop, start:stop]
    eye = torch.eye(layout.size, dtype=torch.float64)
    expected = torch.linalg.solve(blocks + damping * eye, gradients.T).T
    torch.testing.assert_close(solution, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
    assert len(iterations) == len(tracked) and residual < 1e-9
    # The cross-module blocks matter on this model: the full solve is a different vector.
    full = torch.linalg.solve(matrix + damping * eye, gradients.T).T
    assert (full - expected).norm() > 0.05 * expected.norm()
