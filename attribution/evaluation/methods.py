"""The compared methods, each turning query gradients into query factors for the candidate pass.

- factor strategies (``ekfac``, ``kfac``, ``diagonal``) and ``identity``: the engine itself,
  :func:`fit_factors` on the fitting sequences, then :func:`query_factors` with a
  :class:`Preconditioner` at the shared damping;
- ``lissa``: :func:`~attribution.evaluation.lissa.lissa` on mini-batch Gauss-Newton products;
- ``block_exact``: the exact inverse of the module-diagonal part of G, by CG per module: the
  reference for every per-module approximation (what it gives with no error inside a module).

Overhead seconds are everything that does not grow with the number of candidates: fitting,
and preconditioning the queries (the inverse products for LiSSA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.evaluation.config import GroundTruthSpec, MethodSpec
from attribution.evaluation.conjugate_gradient import multi_shift_cg
from attribution.evaluation.gauss_newton import GaussNewton
from attribution.evaluation.lissa import largest_eigenvalue, lissa
from attribution.evaluation.parameters import ParameterLayout
from attribution.evaluation.problem import Problem
from attribution.evaluation.scores import factors_from_gradients
from attribution.scoring.query_factors import QueryFactors, query_factors
from attribution.scoring.stages import identity_factor_set

POWER_ITERATIONS = 10
# LiSSA's scale must exceed every mini-batch's largest eigenvalue; power iteration
# underestimates it and other mini-batches can exceed it.
LISSA_SCALE_MARGIN = 2.0


@dataclass
class Prepared:
    """A method's query factors at one damping."""

    factors: QueryFactors
    overhead_seconds: float
    detail: str


class FactorMethod:
    """EK-FAC, K-FAC, diagonal or the identity on some modules: fitted once, preconditioned per damping and rank."""

    def __init__(self, kind: str, tracked_modules: str, problem: Problem, batch_size: int, seed: int) -> None:
        self.problem = problem
        self.tracked = problem.modules(tracked_modules)
        started = time.perf_counter()
        if kind == "identity":
            self.factor_set: FactorSet = identity_factor_set(self.tracked, problem.fingerprint)
        else:
            batches = problem.fit_batches(batch_size)
            config = FitConfig(strategy=kind, fisher="true", seed=seed, dtype=torch.float64, progress=False)
            self.factor_set = fit_factors(problem.model, self.tracked, lambda: batches, config, problem.fingerprint, {})
        self.fit_seconds = time.perf_counter() - started

    def mean_eigenvalue(self) -> float:
        """``trace(G) / P`` of the fitted approximation (EK-FAC's eigenvalues sum to the trace of each block)."""
        values = [f.corrected_eigenvalues.to(torch.float64) for f in self.factor_set.modules.values()]
        return float(sum(v.sum() for v in values) / sum(v.numel() for v in values))

    def prepare(self, spec: MethodSpec, damping: float) -> Prepared:
        started = time.perf_counter()
        device = next(self.problem.model.parameters()).device
        preconditioner = Preconditioner(self.factor_set, damping, device)
        factors, rejected = query_factors(self.problem.model, self.tracked, self.problem.query_batch.to(device),
                                          preconditioner.apply, spec.rank)
        if rejected:
            raise ValueError(f"method {spec.name}: non-finite preconditioned gradients for queries {rejected}")
        return Prepared(factors, self.fit_seconds + time.perf_counter() - started, _describe(spec))


def prepare_lissa(spec: MethodSpec, problem: Problem, damping: float, budget_seconds: float | None, seed: int) -> Prepared:
    """LiSSA for every query, for ``spec.max_iterations`` steps or within ``budget_seconds``."""
    started = time.perf_counter()
    tracked = problem.modules(spec.tracked_modules)
    layout = ParameterLayout(tracked)
    batches = problem.fit_batches(spec.batch_size, shuffle_seed=seed)
    right_hand_sides = problem.query_vectors(tracked)
    scale = spec.scale
    if scale is None:
        first = GaussNewton(problem.model, tracked, batches[:1])
        scale = LISSA_SCALE_MARGIN * largest_eigenvalue(first, layout.size, POWER_ITERATIONS, seed) + damping

    def minibatch(step: int) -> GaussNewton:
        return GaussNewton(problem.model, tracked, [batches[step % len(batches)]], cache=False)

    remaining = None if budget_seconds is None else max(0.0, budget_seconds - (time.perf_counter() - started))
    result = lissa(minibatch, right_hand_sides, damping, scale, spec.max_iterations, remaining)
    factors = factors_from_gradients(problem.query_ids, layout.split(result.solution), spec.rank)
    budget = "" if budget_seconds is None else f" in {budget_seconds:.1f} s (equal time to {spec.equal_time_to})"
    detail = f"{_describe(spec)}; {result.iterations} steps of {spec.batch_size} sequences{budget}, scale {scale:.3g}"
    return Prepared(factors, time.perf_counter() - started, detail)


def block_diagonal_solve(problem: Problem, spec: MethodSpec, damping: float, solver: GroundTruthSpec,
                         batch_size: int) -> tuple[torch.Tensor, list[int], float]:
    """``x_m = (G_mm + lambda I)^{-1} g_m`` for every module m: EK-FAC, K-FAC and the diagonal
    approximate each G_mm and ignore every G_mn, so this is what they would give with no error
    inside a module. CG per module to ``solver``'s tolerance; returns the (Q, P) solutions, the
    iterations per module and the largest relative residual."""
    tracked = problem.modules(spec.tracked_modules)
    batches = problem.fit_batches(batch_size)
    gradients = problem.query_vectors(tracked)
    pieces, iterations, residual = [], [], 0.0
    for module, right_hand_sides in zip(tracked, gradients.split(ParameterLayout(tracked).sizes, dim=1)):
        operator = GaussNewton(problem.model, [module], batches)
        result = multi_shift_cg(operator, right_hand_sides, [damping], solver.tolerance, solver.max_iterations, snapshot_factor=None)
        pieces.append(result.solutions[0])
        iterations.append(max(result.iterations))
        residual = max(residual, float(result.relative_residuals.max()))
    return torch.cat(pieces, dim=1), iterations, residual


def prepare_block_exact(spec: MethodSpec, problem: Problem, damping: float, solver: GroundTruthSpec, batch_size: int) -> Prepared:
    started = time.perf_counter()
    solution, iterations, residual = block_diagonal_solve(problem, spec, damping, solver, batch_size)
    layout = ParameterLayout(problem.modules(spec.tracked_modules))
    factors = factors_from_gradients(problem.query_ids, layout.split(solution), spec.rank)
    detail = (f"{_describe(spec)}; exact per-module inverse, CG {min(iterations)}-{max(iterations)} iterations per module, "
              f"relative residual <= {residual:.1e}")
    return Prepared(factors, time.perf_counter() - started, detail)


def _describe(spec: MethodSpec) -> str:
    rank = "full rank" if spec.rank is None else f"rank {spec.rank}"
    modules = "" if spec.tracked_modules == "all" else f", {spec.tracked_modules} modules only"
    return f"{spec.kind}, {rank}{modules}"
