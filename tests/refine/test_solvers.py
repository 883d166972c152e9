"""The two solvers against dense solves of small SPD systems, and their failure modes."""

from __future__ import annotations

import torch

from attribution.refine.solvers import CONVERGED, DIVERGED, STEP_LIMIT, preconditioned_cg, preconditioned_momentum


def spd_system(size: int = 40, columns: int = 3, seed: int = 0):
    """An ill-conditioned SPD matrix, a nearby SPD preconditioner's inverse, and right-hand sides."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(-2, 2, size, dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    # The preconditioner knows the spectrum to within a factor of two.
    rough = eigenvalues * torch.empty(size, dtype=torch.float64).uniform_(0.5, 2.0, generator=generator)
    inverse = basis @ torch.diag(1 / rough) @ basis.T
    rhs = torch.randn(columns, size, generator=generator, dtype=torch.float64)
    return matrix, inverse, rhs


def test_cg_reaches_the_dense_solution_and_the_preconditioner_helps():
    matrix, inverse, rhs = spd_system()
    exact = torch.linalg.solve(matrix, rhs.T).T
    plain = preconditioned_cg(lambda v: v @ matrix, rhs, lambda v: v, 1e-12, 200)
    helped = preconditioned_cg(lambda v: v @ matrix, rhs, lambda v: v @ inverse, 1e-12, 200)
    for result in (plain, helped):
        torch.testing.assert_close(result.solution, exact, rtol=1e-8, atol=1e-10)
        assert result.status == [CONVERGED] * 3
        assert all(residual <= 1e-12 for residual in result.relative_residuals)
    assert max(helped.products) < max(plain.products) / 2


def test_cg_in_float32_follows_float64():
    """The solver keeps the right-hand sides' precision: float32 vectors are solved in float32, and ten
    steps land where float64's do."""
    matrix, inverse, rhs = spd_system()
    wide = preconditioned_cg(lambda v: v @ matrix, rhs, lambda v: v @ inverse, 1e-12, 10)
    narrow = preconditioned_cg(lambda v: v @ matrix.float(), rhs.float(), lambda v: v @ inverse.float(), 1e-12, 10)
    assert wide.solution.dtype == torch.float64 and narrow.solution.dtype == torch.float32
    torch.testing.assert_close(narrow.solution.double(), wide.solution, rtol=1e-4, atol=1e-4 * float(wide.solution.abs().max()))
    assert narrow.products == wide.products


def test_cg_first_iterate_is_the_scaled_closed_form():
    matrix, inverse, rhs = spd_system()
    first = preconditioned_cg(lambda v: v @ matrix, rhs, lambda v: v @ inverse, 1e-12, 1)
    closed = rhs @ inverse
    step = (rhs * closed).sum(1) / (closed * (closed @ matrix)).sum(1)
    torch.testing.assert_close(first.solution, step[:, None] * closed)
    assert first.products == [1, 1, 1] and first.status == [STEP_LIMIT] * 3


def test_cg_stops_each_column_at_its_tolerance():
    matrix, inverse, rhs = spd_system()
    rhs[1] = 0.0
    result = preconditioned_cg(lambda v: v @ matrix, rhs, lambda v: v @ inverse, 1e-6, 200)
    assert result.products[1] == 0 and result.status[1] == CONVERGED
    assert all(r <= 1e-6 for r in result.relative_residuals)


def test_cg_flags_non_positive_curvature_and_non_finite_products():
    matrix, inverse, rhs = spd_system()
    indefinite = matrix - 50 * torch.eye(matrix.shape[0], dtype=torch.float64)
    result = preconditioned_cg(lambda v: v @ indefinite, rhs, lambda v: v, 1e-10, 100)
    assert result.status == [DIVERGED] * 3
    assert torch.isfinite(result.solution).all()

    rhs[0] *= 1e8  # only column 0's directions are this long

    def broken(v: torch.Tensor) -> torch.Tensor:
        out = v @ matrix
        out[v.norm(dim=1) > 1e6] = float("nan")
        return out

    result = preconditioned_cg(broken, rhs, lambda v: v @ inverse, 1e-10, 100)
    assert result.status[0] == DIVERGED and torch.isfinite(result.solution[0]).all()
    assert result.status[1:] == [CONVERGED] * 2


def test_momentum_iteration_converges_with_exact_products_and_first_step_is_the_closed_form():
    matrix, inverse, rhs = spd_system()
    exact = torch.linalg.solve(matrix, rhs.T).T
    first = preconditioned_momentum(lambda step: (lambda v: v @ matrix), rhs, lambda v: v @ inverse, 1, 1.0, 0.9)
    torch.testing.assert_close(first.solution, rhs @ inverse)
    # M A has eigenvalues in [0.5, 2]: heavy ball at rate 1/2 and momentum 0.5 converges linearly.
    result = preconditioned_momentum(lambda step: (lambda v: v @ matrix), rhs, lambda v: v @ inverse, 400, 0.5, 0.5,
                                     check=lambda v: v @ matrix)
    torch.testing.assert_close(result.solution, exact, rtol=1e-8, atol=1e-10)
    assert all(r < 1e-10 for r in result.relative_residuals)


def test_momentum_iteration_stops_a_diverging_column():
    matrix, inverse, rhs = spd_system()
    result = preconditioned_momentum(lambda step: (lambda v: v @ matrix), rhs, lambda v: v @ inverse, 200, 50.0, 0.9)
    assert result.status == [DIVERGED] * 3
    assert torch.isfinite(result.solution).all()
