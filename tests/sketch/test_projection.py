"""Gradient sketches against brute force: factored equals dense, the inner product is unbiased, the
variance formula is right for Gaussian sketches and bounds the orthonormal ones', which are exact
when as wide as the module."""

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


def gaussian_projection(seed: int, d_out: int, d_in: int, k: int) -> ModuleProjection:
    generator = torch.Generator().manual_seed(seed)
    return ModuleProjection(torch.randn(k, d_out, generator=generator, dtype=torch.float64) / math.sqrt(k),
                            torch.randn(k, d_in, generator=generator, dtype=torch.float64) / math.sqrt(k))


def estimates_of(a, b, draw) -> torch.Tensor:
    return torch.tensor([float((draw(seed).matrix(a) * draw(seed).matrix(b)).sum()) for seed in range(SEEDS)])


A = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
B = 0.6 * A + torch.randn(9, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 6])
def test_the_variance_formula_is_that_of_gaussian_kronecker_sketches(k):
    estimates = estimates_of(A, B, lambda seed: gaussian_projection(seed, 9, 7, k))
    exact, variance = float((A * B).sum()), sketch_variance(A, B, k)
    assert abs(float(estimates.mean()) - exact) < 4 * math.sqrt(variance / SEEDS)
    # The sample variance of 3000 draws of a heavy-tailed estimate: within 15% of the algebra's.
    assert float(estimates.var()) == pytest.approx(variance, rel=0.15)


@pytest.mark.parametrize("k", [2, 6])
def test_orthonormal_sketches_are_unbiased_with_less_than_the_gaussian_variance(k):
    estimates = estimates_of(A, B, lambda seed: ModuleProjection.draw(seed, module(9, 7), k, dtype=torch.float64))
    bound = sketch_variance(A, B, k)
    assert abs(float(estimates.mean()) - float((A * B).sum())) < 4 * math.sqrt(bound / SEEDS)
    assert 0 < float(estimates.var()) < bound


def test_a_sketch_as_wide_as_the_module_is_exact():
    projection = ModuleProjection.draw(0, module(9, 7), 9, dtype=torch.float64)
    assert float((projection.matrix(A) * projection.matrix(B)).sum()) == pytest.approx(float((A * B).sum()), rel=1e-12)


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
    # variance: the Gaussian bound, summed over the modules' independent sketches.
    assert abs(float(estimates.mean()) - exact) < 4 * math.sqrt(variance / len(estimates))
    assert 0 < float(estimates.var()) < variance


def test_whitened_sketches_estimate_the_same_inner_product_with_the_predicted_variance():
    """Documents sketched with P W^{-1} and queries with P W: the product is unchanged in expectation,
    and its variance is the raw formula's for W_S X W_A and W_S^{-1} G W_A^{-1}."""
    from attribution.sketch.whitening import covariance_roots

    generator = torch.Generator().manual_seed(5)
    x, g = torch.randn(9, 7, generator=generator, dtype=torch.float64), torch.randn(9, 7, generator=generator, dtype=torch.float64)
    s_factor = torch.randn(9, 9, generator=generator, dtype=torch.float64)
    a_factor = torch.randn(7, 7, generator=generator, dtype=torch.float64)
    s_cov, a_cov = s_factor @ s_factor.T, a_factor @ a_factor.T
    (root_s, inverse_s), (root_a, inverse_a) = (covariance_roots(c, torch.linalg.eigh(c).eigenvectors) for c in (s_cov, a_cov))
    assert torch.allclose(root_s @ inverse_s, torch.eye(9, dtype=torch.float64), atol=1e-10)
    estimates = []
    for seed in range(SEEDS):
        base = ModuleProjection.draw(seed, module(9, 7), 4, dtype=torch.float64)
        query, document = base.transformed(root_s, root_a), base.transformed(inverse_s, inverse_a)
        estimates.append(float((query.matrix(x) * document.matrix(g)).sum()))
    estimates = torch.tensor(estimates)
    bound = sketch_variance(root_s @ x @ root_a, inverse_s @ g @ inverse_a, 4)
    assert abs(float(estimates.mean()) - float((x * g).sum())) < 4 * math.sqrt(bound / SEEDS)
    assert 0 < float(estimates.var()) < bound
