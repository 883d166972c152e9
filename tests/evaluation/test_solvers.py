"""Conjugate gradient and LiSSA against dense solves."""

from __future__ import annotations

import pytest
import torch

from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.gauss_newton import (
    GaussNewton,
    dense_gauss_newton,
    use_eager_attention,
)
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.evaluation.conjugate_gradient import multi_shift_cg
from attribution.evaluation.lissa import largest_eigenvalue, lissa
from attribution.models import find_tracked_modules
from attribution.refine.solvers import preconditioned_cg
from tests.tiny import make_batch, random_sequences, tiny_model

SEQUENCES = random_sequences(6, seed=21, min_length=3, max_length=7)


def dense_solve(matrix: torch.Tensor, right_hand_sides: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    return torch.linalg.solve(matrix + damping * eye, right_hand_sides.T).T


def random_spd(size: int, condition: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), size, dtype=torch.float64)) @ basis.T


def test_multi_shift_cg_solves_every_shift_of_a_random_system():
    matrix = random_spd(60, 1e4, seed=0)
    right_hand_sides = torch.randn(4, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    right_hand_sides[2] *= 1e-3  # columns of very different size converge at different iterations
    dampings = [1e-3, 1e-2, 0.5]
    result = multi_shift_cg(lambda v: v @ matrix, right_hand_sides, dampings, tolerance=1e-11, max_iterations=2000)
    for k, damping in enumerate(result.dampings):
        expected = dense_solve(matrix, right_hand_sides, damping)
        torch.testing.assert_close(result.solutions[k], expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
    assert float(result.relative_residuals.max()) < 1e-9
    # The snapshot is the iterate at the 10x looser tolerance: an earlier one, with a residual near 1e-10.
    assert result.snapshot is not None and result.snapshot_tolerance == pytest.approx(1e-10)
    for k, damping in enumerate(result.dampings):
        snapshot_residual = (right_hand_sides - result.snapshot[k] @ matrix - damping * result.snapshot[k]).norm(dim=1)
        assert float((snapshot_residual / right_hand_sides.norm(dim=1)).max()) < 1.5e-10
    # The base system sets the stopping point, so its snapshot is an earlier iterate (a large
    # shift converges so fast that its updates underflow to zero before the base stops).
    assert not torch.equal(result.snapshot[0], result.solutions[0])


@pytest.fixture(scope="module")
def gauss_newton():
    model = tiny_model("gpt_neox")
    use_eager_attention(model)
    tracked = find_tracked_modules(model)
    operator = GaussNewton(model, tracked, [make_batch(SEQUENCES)])
    matrix = dense_gauss_newton(operator, chunk=256)
    right_hand_sides = torch.randn(3, operator.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    config = FitConfig(strategy="ekfac", fisher="true", seed=0, dtype=torch.float64, progress=False)
    factors = fit_factors(model, tracked, lambda: [make_batch(SEQUENCES)], config, "test", {})
    return operator, matrix, right_hand_sides, None, factors, tracked



def test_snapshot_is_kept_per_damping():
    """Within a few iterations a large damping meets the looser tolerance and a tiny one does not:
    the first keeps its snapshot, the second's is NaN."""
    matrix = random_spd(60, 1e4, seed=0)
    right_hand_sides = torch.randn(2, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = multi_shift_cg(lambda v: v @ matrix, right_hand_sides, [1e-6, 10.0], tolerance=1e-3, max_iterations=6)
    small, large = result.dampings.index(1e-6), result.dampings.index(10.0)
    assert result.snapshot is not None
    assert torch.isfinite(result.snapshot[large]).all()
    assert torch.isnan(result.snapshot[small]).all()

def test_cg_on_gauss_newton_products_agrees_with_the_dense_solve(gauss_newton):
    """The CG ground truth equals the explicit solve: relative residual below 1e-9 for every damping."""
    operator, matrix, right_hand_sides, *_ = gauss_newton
    mean_eigenvalue = float(torch.diagonal(matrix).mean())
    dampings = [0.1 * mean_eigenvalue, mean_eigenvalue, 10 * mean_eigenvalue]
    result = multi_shift_cg(operator, right_hand_sides, dampings, tolerance=1e-10, max_iterations=3000)
    assert float(result.relative_residuals.max()) < 1e-9
    for k, damping in enumerate(result.dampings):
        expected = dense_solve(matrix, right_hand_sides, damping)
        torch.testing.assert_close(result.solutions[k], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_lissa_converges_to_the_dense_solve(gauss_newton):
    operator, matrix, right_hand_sides, *_ = gauss_newton
    top = largest_eigenvalue(operator, operator.size, iterations=30)
    assert top == pytest.approx(float(torch.linalg.eigvalsh(matrix)[-1]), rel=1e-3)
    damping = 0.2 * top
    result = lissa(lambda step: operator, right_hand_sides, damping, scale=1.2 * top + damping, max_iterations=120)
    expected = dense_solve(matrix, right_hand_sides, damping)
    assert result.iterations == 120
    assert float((result.solution - expected).norm() / expected.norm()) < 1e-6


def test_lissa_stops_at_its_time_budget(gauss_newton):
    operator, _, right_hand_sides, *_ = gauss_newton
    result = lissa(lambda step: operator, right_hand_sides, damping=1.0, scale=1e3, seconds=0.0)
    assert result.iterations == 0
    torch.testing.assert_close(result.solution, right_hand_sides / 1e3)


def test_ekfac_preconditioned_cg_agrees_with_the_dense_solve(gauss_newton):
    """The CG ground truth as the evaluate job runs it: EK-FAC-preconditioned, converged to a relative residual
    below 1e-9, equals the dense solve. (On this random tiny model it needs about 360 iterations where plain CG
    needs about 94: EK-FAC from one label draw on 6 sequences is a poor preconditioner; not asserted.)"""
    operator, matrix, right_hand_sides, _, factors, tracked = gauss_newton
    damping = 0.1 * float(torch.diagonal(matrix).mean())
    layout = ParameterLayout(tracked)
    preconditioner = Preconditioner(factors, damping)
    result = preconditioned_cg(lambda v: operator(v) + damping * v, right_hand_sides, lambda v: preconditioner.apply_flat(v, layout),
                               tolerance=1e-10, max_products=3000)
    assert max(result.relative_residuals) < 1e-9
    expected = dense_solve(matrix, right_hand_sides, damping)
    torch.testing.assert_close(result.solution, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_flat_preconditioner_is_the_blockwise_ekfac_inverse(gauss_newton):
    """M v equals, block by block, (Q_S (x) Q_A) diag(1 / (Lambda + lambda)) (Q_S (x) Q_A)^T v built as explicit matrices."""
    _, _, right_hand_sides, _, factors, tracked = gauss_newton
    layout = ParameterLayout(tracked)
    applied = layout.split(Preconditioner(factors, 0.3).apply_flat(right_hand_sides, layout))
    for module, block in layout.split(right_hand_sides).items():
        f = factors.modules[module]
        basis = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)  # row-major vec of (d_out, d_in')
        inverse = basis @ torch.diag(1 / (f.corrected_eigenvalues.flatten() + 0.3)) @ basis.T
        expected = block.flatten(1) @ inverse
        torch.testing.assert_close(applied[module].flatten(1), expected, rtol=1e-9, atol=1e-12)
