"""The cross-module curvature diagnostic against quadratic forms of the explicit G and of the dense EK-FAC matrix."""

from __future__ import annotations

import torch

from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton, use_eager_attention
from attribution.curvature.parameters import ParameterLayout
from attribution.evaluation.curvature_structure import curvature_structure
from attribution.models import find_tracked_modules
from tests.tiny import make_batch, random_sequences, tiny_model

SEQUENCES = random_sequences(4, seed=11, min_length=3, max_length=6)


def test_quadratic_forms_and_eigenvalues_equal_the_explicit_matrices():
    model = tiny_model()
    use_eager_attention(model)
    tracked = find_tracked_modules(model)
    layout = ParameterLayout(tracked)
    operator = GaussNewton(model, tracked, [make_batch(SEQUENCES)])
    matrix = dense_gauss_newton(operator, chunk=256)
    config = FitConfig(strategy="ekfac", fisher="true", seed=3, dtype=torch.float64, progress=False)
    factors = fit_factors(model, tracked, lambda: [make_batch(SEQUENCES)], config, "test", {})
    gradients = torch.randn(3, layout.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    structure = curvature_structure(operator, gradients, factors, power_iterations=300)

    bounds = torch.tensor([0, *layout.sizes]).cumsum(0).tolist()
    block_mask = torch.zeros_like(matrix, dtype=torch.bool)
    fitted_matrix = torch.zeros_like(matrix)
    for module, start, stop in zip(tracked, bounds[:-1], bounds[1:]):
        block_mask[start:stop, start:stop] = True
        f = factors.modules[module.name]
        basis = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)
        fitted_matrix[start:stop, start:stop] = basis @ torch.diag(f.corrected_eigenvalues.flatten()) @ basis.T
    expected_full = torch.einsum("qi,ij,qj->q", gradients, matrix, gradients)
    expected_block = torch.einsum("qi,ij,qj->q", gradients, matrix * block_mask, gradients)
    expected_fitted = torch.einsum("qi,ij,qj->q", gradients, fitted_matrix, gradients)
    torch.testing.assert_close(structure.full, expected_full, rtol=1e-6, atol=0)
    torch.testing.assert_close(structure.block_diagonal, expected_block, rtol=1e-6, atol=0)
    torch.testing.assert_close(structure.fitted, expected_fitted, rtol=1e-8, atol=0)
    assert abs(structure.cross_module_share - float((1 - expected_block / expected_full).mean())) < 1e-6
    # The tiny model's modules are coupled: the share is not trivially zero.
    assert abs(structure.cross_module_share) > 0.01

    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert structure.largest_eigenvalue <= float(eigenvalues[-1]) * (1 + 1e-9)
    assert structure.largest_eigenvalue >= 0.99 * float(eigenvalues[-1])
    fitted_top = max(float(f.corrected_eigenvalues.max()) for f in factors.modules.values())
    assert structure.largest_fitted_eigenvalue == fitted_top
    assert abs(fitted_top - float(torch.linalg.eigvalsh(fitted_matrix)[-1])) < 1e-9 * fitted_top
