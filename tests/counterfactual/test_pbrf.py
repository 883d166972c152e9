"""The PBRF response against the damped influence computed from an explicit Gauss-Newton matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.counterfactual.pbrf import ProximalObjective, pbrf_responses
from attribution.counterfactual.pbrf_pairs import choose_documents
from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton, only_these_require_grad
from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import sequence_log_prob
from attribution.data.queries import Query
from attribution.models import find_tracked_modules
from tests.tiny import make_batch, query_batch, random_sequences, tiny_model


def flat_gradients(model, layout: ParameterLayout, batch) -> torch.Tensor:
    """(B, P): the gradient of each item's summed target log-probability, one backward per item."""
    rows = []
    for item in range(len(batch.ids)):
        with only_these_require_grad(model, layout.parameters), torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            value = sequence_log_prob(logits, batch)[item]
            rows.append(layout.from_parameter_shapes(torch.autograd.grad(value, layout.parameters)))
    return torch.stack(rows).to(torch.float64)


# Not Llama: its RMSNorm computes in float32 whatever the model's dtype, a rounding that moves with
# theta and stalls the line search long before the O(epsilon^2) objective is minimised.
@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2"])
def test_pbrf_response_is_the_damped_influence_to_first_order(architecture):
    model = tiny_model(architecture)
    tracked = find_tracked_modules(model)
    layout = ParameterLayout(tracked)
    sample = [make_batch(random_sequences(4, seed=1, min_length=4, max_length=7))]
    # A different damping per module: the proximal term must apply each module's own.
    damping = {m.name: 0.02 * (1 + n) for n, m in enumerate(tracked)}
    diagonal = torch.cat([torch.full((size,), damping[m.name], dtype=torch.float64)
                          for m, size in zip(tracked, layout.sizes)])
    objective = ProximalObjective(model, tracked, sample, damping)

    gauss_newton = dense_gauss_newton(GaussNewton(model, tracked, sample))
    document = make_batch(random_sequences(1, seed=2, min_length=6, max_length=6), ids=["z"])
    queries = query_batch([[3, 4, 5], [7, 8]], [[9], [10, 11]])
    down = flat_gradients(model, layout, document)[0]
    up = flat_gradients(model, layout, queries)
    influence = up @ torch.linalg.solve(gauss_newton + torch.diag(diagonal), down)

    def error(epsilon: float) -> float:
        response = pbrf_responses(objective, document, queries, epsilon, steps=600, tolerance=1e-9)
        assert response.doc_id == "z"
        assert response.solve.relative_gradient < 1e-4
        return float(np.abs(np.array(response.responses) - influence.numpy()).max() / np.abs(influence.numpy()).max())

    # R = I + O(epsilon): the response approaches the influence linearly as the up-weight shrinks.
    coarse, fine = error(1e-3), error(1e-4)
    assert fine < 0.1
    assert fine < coarse / 5
    # The objective leaves the model where it found it.
    assert all(torch.equal(p, s) for p, s in zip(objective.parameters, objective.start))


def test_documents_are_true_sources_first_then_seeded_random():
    queries = [Query("q0", "a", " b", ("d3",)), Query("q1", "a", " c", ("d3", "d5")), Query("q2", "a", " d", ())]
    doc_ids = [f"d{n}" for n in range(10)]
    chosen = choose_documents(queries, doc_ids, 4, seed=0)
    assert chosen[:2] == ["d3", "d5"]
    assert len(set(chosen)) == 4 and set(chosen) <= set(doc_ids)
    assert chosen == choose_documents(queries, doc_ids, 4, seed=0)
