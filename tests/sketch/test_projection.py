"""Gradient sketches against brute force: factored equals dense, the inner product is unbiased,
and its variance is the one the projection's algebra predicts."""

from __future__ import annotations

import math

import pytest
import torch

from attribution.curvature.precondition import Preconditioner
from attribution.models import TrackedModule, find_tracked_modules
from attribution.scoring.query_factors import query_factors
from attribution.sketch.projection import ModuleProjection, sketch_variance
from attribution.sketch.sketcher import Sketcher
from tests.curvature.test_fit import fit
from tests.scoring.test_engine import COMPLETIONS, DOCUMENTS, PROMPTS, autograd_gradient
from tests.tiny import make_batch, query_batch, tiny_model

SEEDS = 3000


def module(d_out: int, d_in: int) -> TrackedModule:
    return TrackedModule("layer.0.mlp", torch.nn.Linear(d_in, d_out, bias=False), d_in, d_out, False)


def test_the_factored_sketch_is_the_sketch_of_the_summed_gradient():
    generator = torch.Generator().manual_seed(0)
    ds, a = torch.randn(3, 7, 6, generator=generator, dtype=torch.float64), torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)
    projection = ModuleProjection.draw(1, module(6, 5), k=4, dtype=torch.float64)
    assert torch.allclose(projection.tokens(ds, a), projection.matrix(ds.mT @ a), rtol=1e-12, atol=1e-12)
    left, right = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64), torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    assert torch.allclose(projection.factors(left, right), projection.matrix(left @ right.mT), rtol=1e-12, atol=1e-12)


def test_projections_depend_on_the_seed_and_module_only():
    first = ModuleProjection.draw(7, module(6, 5), k=4)
    again = ModuleProjection.draw(7, module(6, 5), k=4)
    other = ModuleProjection.draw(8, module(6, 5), k=4)
    assert torch.equal(first.outputs, again.outputs) and not torch.equal(first.outputs, other.outputs)


@pytest.mark.parametrize("k", [2, 6])
def test_the_sketched_inner_product_is_unbiased_with_the_predicted_variance(k):
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    b = 0.6 * a + torch.randn(9, 7, generator=generator, dtype=torch.float64)
    estimates = torch.tensor([(ModuleProjection.draw(seed, module(9, 7), k, dtype=torch.float64).matrix(a)
                               * ModuleProjection.draw(seed, module(9, 7), k, dtype=torch.float64).matrix(b)).sum()
                              for seed in range(SEEDS)])
    exact, variance = float((a * b).sum()), sketch_variance(a, b, k)
    assert abs(float(estimates.mean()) - exact) < 4 * math.sqrt(variance / SEEDS)
    # The sample variance of 3000 draws of a heavy-tailed estimate: within 15% of the algebra's.
    assert float(estimates.var()) == pytest.approx(variance, rel=0.15)


def test_on_a_model_document_and_query_sketches_estimate_the_influence_without_bias():
    """Brute force: autograd weight gradients of each document and query, preconditioned
    explicitly; the sketches come from the per-token factors and the rank-r query factors."""
    model = tiny_model()
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(fit(model), None)
    queries, rejected = query_factors(model, tracked, query_batch(PROMPTS[:1], COMPLETIONS[:1]), preconditioner.apply, None)
    assert rejected == []
    query_gradient = {name: preconditioner.apply(name, gradient) for name, gradient in
                      autograd_gradient(model, tracked, query_batch(PROMPTS[:1], COMPLETIONS[:1])).items()}
    documents = make_batch(DOCUMENTS[:2])
    document_gradient = autograd_gradient(model, tracked, make_batch(DOCUMENTS[:1]))
    exact = sum(float((query_gradient[m.name] * document_gradient[m.name]).sum()) for m in tracked)
    variance = sum(sketch_variance(query_gradient[m.name], document_gradient[m.name], 3) for m in tracked)
    estimates = []
    for seed in range(400):
        sketcher = Sketcher(model, tracked, seed=seed, k=3, dtype=torch.float64)
        sketched_documents = sketcher.documents(documents)
        sketched_query = sketcher.queries(queries)[0]
        if seed == 0:  # the factored document sketch is the sketch of the brute-force gradient
            brute = torch.cat([sketcher.projections[m.name].matrix(document_gradient[m.name]).flatten() for m in tracked])
            assert torch.allclose(sketched_documents[0], brute, rtol=1e-9, atol=1e-12)
            brute_query = torch.cat([sketcher.projections[m.name].matrix(query_gradient[m.name]).flatten() for m in tracked])
            assert torch.allclose(sketched_query, brute_query, rtol=1e-9, atol=1e-12)
        estimates.append(float(sketched_query @ sketched_documents[0]))
    estimates = torch.tensor(estimates)
    assert abs(float(estimates.mean()) - exact) < 4 * math.sqrt(variance / len(estimates))
    assert float(estimates.var()) == pytest.approx(variance, rel=0.3)
