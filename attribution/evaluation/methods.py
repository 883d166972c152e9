"""The compared methods, each turning query gradients into query factors for the candidate pass.

- factor strategies (``ekfac``, ``kfac``, ``diagonal``) and ``identity``: the engine itself,
  :func:`fit_factors` on each stage's fitting sequences, then the engine's query factors at the
  shared damping (chained over the stages of a multi-stage problem);
- ``refined``: the same, with the query-side refinement of :mod:`attribution.refine` on each
  stage's true Gauss-Newton matrix;
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
from attribution.curvature.gauss_newton import GaussNewton
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.evaluation.config import GroundTruthSpec, MethodSpec
from attribution.evaluation.conjugate_gradient import multi_shift_cg
from attribution.evaluation.ground_truth import Damping
from attribution.evaluation.lissa import largest_eigenvalue, lissa
from attribution.evaluation.problem import Problem
from attribution.evaluation.scores import factors_from_gradients
from attribution.refine.inverse import StageInverse
from attribution.scoring.query_factors import QueryFactors, factorise
from attribution.scoring.stages import Stages, identity_factor_set
from attribution.settings import RefineSettings, SettingsError

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
    """EK-FAC, K-FAC, diagonal or the identity on some modules, fitted once per stage; its query factors
    at any damping and rank are the engine's own (:meth:`Stages.query_factors`), closed form or refined."""

    def __init__(self, kind: str, tracked_modules: str, problem: Problem, batch_size: int, seed: int) -> None:
        self.problem = problem
        self.kind = kind
        self.tracked = [stage.modules(tracked_modules) for stage in problem.stages]
        self.batch_size = batch_size
        self.seed = seed
        started = time.perf_counter()
        self.factor_sets: list[FactorSet] = []
        for stage, tracked in zip(problem.stages, self.tracked):
            if kind == "identity":
                self.factor_sets.append(identity_factor_set(tracked, stage.fingerprint))
            else:
                batches = stage.fit_batches(batch_size)
                config = FitConfig(strategy=kind, fisher="true", seed=seed, dtype=torch.float64, progress=False)
                self.factor_sets.append(fit_factors(stage.model, tracked, lambda batches=batches: batches, config,
                                                    stage.fingerprint, {}))
        self.fit_seconds = time.perf_counter() - started

    @property
    def factor_set(self) -> FactorSet:
        """The candidate stage's factors (the only stage of a single-stage problem)."""
        return self.factor_sets[-1]

    def mean_eigenvalues(self) -> list[float]:
        """Per stage, ``trace(G) / P`` of the fitted approximation (EK-FAC's eigenvalues sum to the trace of each block)."""
        means = []
        for factor_set in self.factor_sets:
            values = [f.corrected_eigenvalues.to(torch.float64) for f in factor_set.modules.values()]
            means.append(float(sum(v.sum() for v in values) / sum(v.numel() for v in values)))
        return means

    def stages(self, damping: Damping, refine: RefineSettings = RefineSettings(), held_out: bool = False) -> Stages:
        """The engine's stages at this damping (one value per stage), refined on each stage's fit sample
        (or as many held-out sequences) when ``refine.method`` is not ``none``."""
        inverses = []
        for stage, tracked, factor_set, value in zip(self.problem.stages, self.tracked, self.factor_sets, damping):
            device = next(stage.model.parameters()).device
            dtype = torch.promote_types(next(stage.model.parameters()).dtype, torch.float32)
            sample = None
            if refine.enabled:
                batch_size = refine.batch_size if refine.method == "stochastic" else self.batch_size
                sample = stage.fit_batches(batch_size, shuffle_seed=None, held_out=held_out)
                if not sample:
                    raise SettingsError(f"no held-out sequences for stage {stage.name}: the corpus has no documents "
                                        "beyond evaluate.fit_sequences")
            inverses.append(StageInverse(stage.name, stage.model, tracked, Preconditioner(factor_set, value, device, dtype),
                                         refine, sample))
        query, candidate = self.problem.query_stage, self.problem.candidate_stage
        return Stages(candidate.model, candidate.tokenizer, query.model, query.tokenizer, self.tracked[-1], self.tracked[0],
                      inverses, self.kind, {}, {})

    def prepare(self, spec: MethodSpec, damping: Damping) -> Prepared:
        started = time.perf_counter()
        prepared = self.stages(damping).query_factors(self.problem.query_batch, spec.rank)
        if prepared.rejected:
            raise ValueError(f"method {spec.name}: non-finite preconditioned gradients for queries {prepared.rejected}")
        return Prepared(prepared.factors, self.fit_seconds + time.perf_counter() - started, _describe(spec))

    def prepare_refined(self, spec: MethodSpec, damping: Damping) -> list[tuple[str, Prepared]]:
        """The refined method's factors, and (single-stage) those of its iterates at ``spec.curve``'s step counts."""
        refine = RefineSettings(method=spec.solver, steps=spec.steps, batch_size=spec.batch_size, tolerance=spec.tolerance,
                                max_sequences=None, preconditioner_damping=spec.preconditioner_damping,
                                learning_rate=spec.learning_rate, momentum=spec.momentum, seed=self.seed)
        started = time.perf_counter()
        stages = self.stages(damping, refine, held_out=spec.sample == "held_out")
        prepared = stages.query_factors(self.problem.query_batch, spec.rank)
        seconds = self.fit_seconds + time.perf_counter() - started
        if prepared.rejected:
            raise ValueError(f"method {spec.name}: non-finite refined gradients for queries {prepared.rejected}")
        detail = f"{_describe(spec)}; {_refinement_summary(spec, prepared.diagnostics)}"
        results = [(spec.name, Prepared(prepared.factors, seconds, detail))]
        if spec.curve and not self.problem.multi_stage:
            results += self._curve(spec, stages)
        return results

    def _curve(self, spec: MethodSpec, stages: Stages) -> list[tuple[str, Prepared]]:
        inverse = stages.inverses[0]
        started = time.perf_counter()
        vectors = self.problem.query_vectors(inverse.tracked)
        steps = sorted(set(spec.curve))
        result = inverse.solve(vectors, snapshot_steps=steps)
        seconds_per_step = (time.perf_counter() - started) / max(1, max(result.products))
        rows = []
        for step in steps:
            factors, rejected = factorise(self.problem.query_ids, inverse.layout.split(result.snapshots[step]), spec.rank)
            if rejected:
                continue
            detail = f"{_describe(spec)}; iterate after {step} {spec.solver} steps (of one solve, the same for every step count)"
            rows.append((f"{spec.name}@{step}", Prepared(factors, self.fit_seconds + step * seconds_per_step, detail)))
        return rows


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


def _refinement_summary(spec: MethodSpec, diagnostics: list[dict]) -> str:
    """Products and residuals per stage, as ranges over the queries."""
    parts = []
    for stage in dict.fromkeys(d["stage"] for d in diagnostics):
        rows = [d for d in diagnostics if d["stage"] == stage]
        products = [d["gauss_newton_products"] for d in rows]
        residuals = [d["relative_residual"] for d in rows]
        fallbacks = sum(1 for d in rows if d["fallback"])
        parts.append(f"{stage}: {min(products)}-{max(products)} {spec.solver} products, relative residual "
                     f"{min(residuals):.1e}-{max(residuals):.1e}" + (f", {fallbacks} fell back to the closed form" if fallbacks else ""))
    sample = "the ground truth's fit sample" if spec.sample == "fit" else "a held-out sample of the same size"
    return f"refined on {sample}; " + "; ".join(parts)


def _describe(spec: MethodSpec) -> str:
    rank = "full rank" if spec.rank is None else f"rank {spec.rank}"
    modules = "" if spec.tracked_modules == "all" else f", {spec.tracked_modules} modules only"
    return f"{spec.kind}, {rank}{modules}"
