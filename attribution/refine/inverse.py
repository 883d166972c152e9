"""One stage's ``(G + D)^{-1}``: the EK-FAC closed form, or refined on the stage's true Gauss-Newton matrix.

For a stage with model theta, tracked modules and damping D (per module, as the closed form's),
the refined inverse solves ``(G + D) x = v`` with G the Gauss-Newton matrix of the stage's sample
over *all* its tracked modules together (cross-module blocks included), preconditioned by the
EK-FAC inverse ``M = (G_hat + c D)^{-1}`` (``c`` = ``refine.preconditioner_damping``), from x = 0
so that the first iterate is the closed form scaled by its optimal step (see
:mod:`attribution.refine.solvers`). A query whose solve diverges falls back to the closed form,
and its diagnostics say so. The stochastic iteration, which has no such guarantee, is checked
against the closed form in the A-norm on the whole sample; with an estimated step it is rerun
with a shorter one when it ended further away, and a query that still does falls back.

Multi-stage scoring chains two of these, fine-tuned stage first:
``P_q = (G_pt + D_pt)^{-1} (G_ft + D_ft)^{-1} grad m(q; theta_ft)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from attribution.curvature.gauss_newton import GaussNewton, eager_attention
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.data.batching import TokenBatch
from attribution.models import TrackedModule
from attribution.refine.solvers import DIVERGED, Operator, SolveResult, preconditioned_cg, preconditioned_momentum
from attribution.settings import RefineSettings

if TYPE_CHECKING:
    from attribution.refine.product_pool import RemoteGaussNewton


@dataclass
class StageInverse:
    """``v -> (G + D)^{-1} v`` on (Q, P) vectors of ``ParameterLayout(tracked)``.

    ``sample`` None: the closed form ``(G_hat + D)^{-1}``. Otherwise refined on the Gauss-Newton
    matrix of ``sample`` with ``settings.method``; with ``products`` (``refine.workers``), that matrix's
    whole-sample products are taken by the Ray workers that hold the sample's parts
    (:mod:`attribution.refine.product_pool`), the stochastic iteration's mini-batch steps here.
    """

    name: str
    model: PreTrainedModel
    tracked: Sequence[TrackedModule]
    preconditioner: Preconditioner
    settings: RefineSettings
    sample: list[TokenBatch] | None = None
    products: RemoteGaussNewton | None = None

    def __post_init__(self) -> None:
        self.layout = ParameterLayout(self.tracked)
        self.solver_preconditioner = self.preconditioner.with_damping_scaled(self.settings.preconditioner_damping)

    @cached_property
    def damping(self) -> torch.Tensor:
        """D as a (P,) vector in the solver's precision: made when a solve first needs it (4 bytes per
        tracked parameter in float32, 28 GiB at 8B, which the closed form never needs)."""
        return self.preconditioner.damping_vector(self.layout, self.dtype, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The solver's vectors: the model's precision, at least float32."""
        return torch.promote_types(next(self.model.parameters()).dtype, torch.float32)

    def closed_form(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.preconditioner.apply_flat(vectors, self.layout)

    def __call__(self, vectors: torch.Tensor, query_ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The inverse applied to every column, and per query how it was obtained (refined stages only)."""
        if self.sample is None:
            return self.closed_form(vectors), []
        started = time.perf_counter()
        result = self.solve(vectors)
        solution = result.solution
        diagnostics = []
        seconds = (time.perf_counter() - started) / max(1, len(query_ids))
        for column, query_id in enumerate(query_ids):
            fallback = result.status[column] == DIVERGED or not bool(torch.isfinite(solution[column]).all())
            if fallback:
                solution[column] = self.closed_form(vectors[column : column + 1].to(self.device))[0].to(solution.dtype)
            diagnostics.append({
                "query_id": query_id,
                "stage": self.name,
                "method": self.settings.method,
                "gauss_newton_products": result.products[column],
                "sequence_products": result.sequence_passes[column],
                "product_workers": len(self.products.workers) if self.products is not None else 0,
                "relative_residual": result.relative_residuals[column],
                "status": result.status[column],
                "fallback": "closed form (the solve diverged or ended further from the solution)" if fallback else None,
                "seconds": seconds,
            })
        return solution, diagnostics

    def _damped(self, operator: Operator) -> Operator:
        damping = self.damping

        def apply(vectors: torch.Tensor) -> torch.Tensor:
            product = operator(vectors)
            return product.addcmul_(vectors.to(product.dtype), damping.to(product.dtype))

        return apply

    def _whole_sample(self, cached_sequences: int | None) -> Operator:
        """``V -> G V`` over the whole sample: on the ``refine.workers`` (each keeping its part's graphs as
        ``refine.cached_sequences`` says), else in this process keeping ``cached_sequences``."""
        if self.products is not None:
            return self.products
        assert self.sample is not None
        return GaussNewton(self.model, self.tracked, self.sample, cached_sequences=cached_sequences)

    def _precondition(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.solver_preconditioner.apply_flat(vectors, self.layout)

    @property
    def sample_sequences(self) -> int:
        return sum(len(batch.ids) for batch in self.sample or [])

    def solve(self, vectors: torch.Tensor, snapshot_steps: Sequence[int] = ()) -> SolveResult:
        """The solver's raw result on (Q, P) ``vectors`` (refined stages only)."""
        if self.sample is None:
            raise ValueError(f"stage {self.name} has no refinement sample")
        with eager_attention(self.model):
            return self._solve(vectors.to(self.device, self.dtype), snapshot_steps)

    def _solve(self, vectors: torch.Tensor, snapshot_steps: Sequence[int]) -> SolveResult:
        settings = self.settings
        assert self.sample is not None
        if settings.method == "cg":
            operator = self._damped(self._whole_sample(settings.cached_sequences))
            result = preconditioned_cg(operator, vectors, self._precondition, settings.tolerance, settings.steps, snapshot_steps)
            result.sequence_passes = [products * self.sample_sequences for products in result.products]
            return result
        order = np.random.default_rng(settings.seed).permutation(len(self.sample))

        def minibatch(step: int) -> Operator:
            batch = self.sample[order[step % len(order)]]
            return self._damped(GaussNewton(self.model, self.tracked, [batch], cache=False))

        whole = self._damped(self._whole_sample(cached_sequences=0))
        rate = settings.learning_rate
        if rate is None:
            sharpest = largest_preconditioned_eigenvalue([minibatch(step) for step in range(POWER_ITERATIONS)],
                                                         self._precondition, vectors)
            rate = stable_momentum_rate(sharpest, settings.momentum)
        spent, passes = [0] * len(vectors), [0] * len(vectors)
        batch = min(settings.batch_size, self.sample_sequences)
        for attempt in range(RATE_RETRIES + 1):
            result = preconditioned_momentum(minibatch, vectors, self._precondition, settings.steps, rate, settings.momentum,
                                             check=whole, snapshot_steps=snapshot_steps)
            worse = self._worse_than_closed_form(whole, vectors, result)
            # Per attempt: its mini-batch steps, one whole-sample residual check and the two products
            # of the comparison with the closed form.
            passes = [before + (used - 1) * batch + 3 * self.sample_sequences for used, before in zip(result.products, passes)]
            result.products = [used + 2 + before for used, before in zip(result.products, spent)]
            result.sequence_passes = passes
            # A step the user set is theirs; an estimated one is shortened when the iteration ran away.
            if settings.learning_rate is not None or not any(worse) or attempt == RATE_RETRIES:
                break
            spent, rate = result.products, rate / RATE_BACKOFF
        result.status = [DIVERGED if bad else status for bad, status in zip(worse, result.status)]
        return result

    def _worse_than_closed_form(self, whole: Operator, vectors: torch.Tensor, result: SolveResult) -> list[bool]:
        """Per column, whether the iterate is further from the solution than the closed form, in the
        norm the solve minimises: ``f(x) = x^T A x / 2 - b^T x = ||x - x*||_A^2 / 2 + const``. Two
        whole-sample products (the iterate's and the closed form's)."""
        closed = self.closed_form(vectors)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return 0.5 * (x * whole(x)).sum(1) - (vectors * x).sum(1)

        iterate = torch.nan_to_num(result.solution.to(vectors.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        finite = torch.isfinite(result.solution).all(1)
        return [(not ok) or status == DIVERGED or bool(f > g)
                for ok, status, f, g in zip(finite.tolist(), result.status, objective(iterate), objective(closed))]


# The stochastic iteration's estimated step: how often, and by how much, it is shortened when the
# iterate ends further from the solution than the closed form it is meant to improve on.
RATE_RETRIES = 2
RATE_BACKOFF = 4.0
POWER_ITERATIONS = 10


def stable_momentum_rate(sharpest: float, momentum: float) -> float:
    """The step ``2 (1 - beta) / lambda_max`` of heavy-ball momentum on mini-batch operators.

    On a fixed operator heavy ball is stable up to ``lr lambda_max < 2 (1 + beta)``; on operators
    that change every step it is not: on the demo (mini-batches of 8, beta 0.9) ``1 / lambda_max``
    of the sharpest mini-batch diverged, half of it did not. The step here is the plain
    gradient-descent limit ``2 / lambda_max`` on the averaged step ``lr / (1 - beta)``.
    """
    return 2.0 * (1.0 - momentum) / sharpest


def largest_preconditioned_eigenvalue(operators: Sequence[Operator], preconditioner: Operator, vectors: torch.Tensor) -> float:
    """The largest Rayleigh quotient of ``M A_k`` seen by a power iteration that takes its k-th step
    on ``operators[k]``, from M applied to the mean right-hand side.

    ``M A`` is similar to the symmetric ``M^{1/2} A M^{1/2}``, so its eigenvalues are real and
    positive; the query gradients lie mostly along its top directions, which makes them a good
    start. Stepping through several mini-batches finds the sharpest of them, not the first one's:
    on the demo their largest eigenvalues spread over a factor of three.
    """
    vector = preconditioner(vectors.mean(0, keepdim=True))
    largest = 0.0
    for operator in operators:
        vector = vector / vector.norm().clamp_min(torch.finfo(vector.dtype).tiny)
        image = preconditioner(operator(vector).to(vectors.dtype))
        largest = max(largest, float((vector * image).sum()))
        vector = image
    return largest


def chain(stages: Sequence[StageInverse], vectors: torch.Tensor, query_ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Apply each stage's inverse in turn (fine-tuned stage first), collecting every stage's diagnostics."""
    diagnostics: list[dict[str, Any]] = []
    for stage in stages:
        vectors, stage_diagnostics = stage(vectors, query_ids)
        diagnostics += stage_diagnostics
    return vectors, diagnostics
