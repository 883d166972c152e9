"""The scores each method implies, through the engine's candidate pass, against explicit autograd algebra.

The independent computation: parameter gradients of ``log p(z)`` and of the query's
completion log-probability by plain ``backward()``, the explicit Gauss-Newton matrix, and
``I(q, z) = g_q^T (G + lambda I)^{-1} g_z`` by a dense solve.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.curvature.gauss_newton import (
    GaussNewton,
    dense_gauss_newton,
    use_eager_attention,
)
from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import sequence_log_prob
from attribution.evaluation.scores import factors_from_gradients, score_candidates
from attribution.models import find_tracked_modules
from attribution.scoring.query_factors import per_sequence_gradients
from tests.tiny import make_batch, query_batch, random_sequences, tiny_model

FIT = random_sequences(5, seed=3, min_length=4, max_length=8)
DOCUMENTS = random_sequences(7, seed=4, min_length=3, max_length=9)
PROMPTS = [[3, 5, 7], [11, 2], [30, 31, 32, 33]]
COMPLETIONS = [[9, 10], [4], [6, 8, 12]]


def autograd_gradients(model, layout: ParameterLayout, batch) -> torch.Tensor:
    """(B, P): one ``backward()`` per sequence of its summed target log-probability."""
    rows = []
    for row in range(len(batch.ids)):
        model.zero_grad()
        logits = model(input_ids=batch.input_ids[row : row + 1], attention_mask=batch.attention_mask[row : row + 1]).logits
        single = type(batch)(ids=[batch.ids[row]], shards=[batch.shards[row]], input_ids=batch.input_ids[row : row + 1],
                             attention_mask=batch.attention_mask[row : row + 1], target_mask=batch.target_mask[row : row + 1],
                             truncated=[False])
        sequence_log_prob(logits, single).sum().backward()
        rows.append(layout.join({m.name: m.weight_gradient().unsqueeze(0) for m in layout.tracked})[0])
    model.zero_grad()
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt_neox")
    use_eager_attention(model)
    tracked = find_tracked_modules(model)
    layout = ParameterLayout(tracked)
    queries = query_batch(PROMPTS, COMPLETIONS)
    documents = [make_batch(DOCUMENTS[:4], [f"d{i}" for i in range(4)]), make_batch(DOCUMENTS[4:], [f"d{i}" for i in range(4, 7)])]
    matrix = dense_gauss_newton(GaussNewton(model, tracked, [make_batch(FIT)]), chunk=512)
    return model, tracked, layout, queries, documents, matrix


def test_query_vectors_equal_autograd_gradients(setup):
    model, tracked, layout, queries, _, _ = setup
    vectors = layout.join(per_sequence_gradients(model, tracked, queries))
    torch.testing.assert_close(vectors, autograd_gradients(model, layout, queries), rtol=1e-8, atol=1e-10)


def test_candidate_pass_of_exact_solutions_equals_explicit_influence(setup):
    model, tracked, layout, queries, documents, matrix = setup
    damping = 0.5 * float(torch.diagonal(matrix).mean())
    query_gradients = autograd_gradients(model, layout, queries)
    solutions = torch.linalg.solve(matrix + damping * torch.eye(layout.size, dtype=torch.float64), query_gradients.T).T
    scores = score_candidates(model, tracked, factors_from_gradients(queries.ids, layout.split(solutions), None), documents)

    document_gradients = torch.cat([autograd_gradients(model, layout, batch) for batch in documents])
    expected = (document_gradients @ solutions.T).numpy()
    assert scores.scores.shape == (7, 3)
    np.testing.assert_allclose(scores.scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    # Damping matters here: the gradient dot product is a different ranking.
    assert not np.allclose(expected, (document_gradients @ query_gradients.T).numpy() / damping, rtol=0.05)
