"""The proximal Bregman response function (PBRF, Bae et al. 2022; Grosse et al. 2023, eq. 12).

Up-weighting one document z by ``epsilon`` from the trained weights theta_s, over the tracked
parameters theta (every other weight stays fixed):

    theta(epsilon) = argmin_theta  (1/N) sum_n sum_t KL(p_{n,t}(theta_s) || p_{n,t}(theta))
                                   - epsilon log p(z; theta)
                                   + sum_m (lambda_m / 2) ||theta_m - theta_s,m||^2,

with n over the N sequences of the fit sample and t over their target positions, ``p`` the
model's next-token distribution and lambda_m module m's damping. The first term is the Bregman
divergence of the cross-entropy in the logits (for softmax it is this KL, whatever the label),
whose Hessian at theta_s is exactly the per-sequence-averaged Gauss-Newton matrix G of the fit
sample; its gradient there is zero. So the damped influence
``I(q, z) = grad m(q)^T (G + D)^{-1} grad log p(z)`` is the derivative of ``m(q; theta(epsilon))``
at epsilon = 0, and the PBRF response we compare it with is

    R(q, z) = (m(q; theta(epsilon)) - m(q; theta_s)) / epsilon,

equal to I(q, z) up to O(epsilon) when the minimiser is found. Up-weighting only (epsilon > 0): the
down-weighted objective rewards making z unlikely, which the proximal terms bound only for small
epsilon. Each theta(epsilon) is found by L-BFGS (strong Wolfe line search) on the full-batch
objective, in float64, from theta_s; no Gauss-Newton product is used, so the comparison is
independent of the engine's curvature code.

The proximal term and the response cover the tracked parameters only, because that is all the
influence covers: the scores' G and damping are defined on the tracked modules, and an untracked
weight (embeddings, norms, unembedding) has no damping to be proximal with.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel

from attribution.curvature.gauss_newton import only_these_require_grad
from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import TokenBatch, sequence_log_prob
from attribution.models import ModelError, TrackedModule

LBFGS_HISTORY = 50


@dataclass(frozen=True)
class PbrfSolve:
    """How theta(epsilon) was reached: L-BFGS iterations, objective evaluations, and the gradient
    norm left relative to the one at theta_s (``epsilon ||grad log p(z)||``)."""

    iterations: int
    evaluations: int
    relative_gradient: float
    seconds: float


@dataclass(frozen=True)
class PbrfResponse:
    """R(q, z) of one document for every query, and its solve."""

    doc_id: str
    responses: list[float]
    solve: PbrfSolve


def proximal_damping(tracked: Sequence[TrackedModule], damping: Mapping[str, float],
                     parameters: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """lambda_m over the elements of each of ``parameters``: one number, or one per expert of a fused
    experts parameter. L-BFGS moves whole parameters, so a fused one must have every expert tracked."""
    by_slice: dict[int, dict[int | None, float]] = {}
    names: dict[int, str] = {}
    for module in tracked:
        for piece in module.storage:
            by_slice.setdefault(id(piece.parameter), {})[piece.index] = float(damping[module.name])
            names.setdefault(id(piece.parameter), module.name)
    result = []
    for parameter in parameters:
        slices = by_slice[id(parameter)]
        if None in slices:
            result.append(torch.tensor(slices[None], dtype=parameter.dtype, device=parameter.device))
            continue
        missing = sorted(set(range(parameter.shape[0])) - set(slices))
        if missing:
            raise ModelError(f"the PBRF moves a fused experts parameter whole, but model.tracked_modules leaves out "
                             f"experts {missing} of the one {names[id(parameter)]} is part of: track all of its experts or none")
        per_expert = torch.tensor([slices[e] for e in range(parameter.shape[0])], dtype=parameter.dtype, device=parameter.device)
        result.append(per_expert.reshape(-1, *[1] * (parameter.dim() - 1)))
    return result


class ProximalObjective:
    """The PBRF objective of the module docstring on a float64 copy of the model."""

    def __init__(self, model: PreTrainedModel, tracked: Sequence[TrackedModule], sample: Sequence[TokenBatch],
                 damping: Mapping[str, float]) -> None:
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        # Eager attention takes its softmax in float32 in several architectures: rounding that
        # moves with theta and stalls the line search at a gradient ~1e-5 of the initial one. The
        # objective needs first derivatives only, which SDPA has, in float64 throughout.
        self.model.set_attn_implementation("sdpa")
        own = dict(self.model.named_modules())
        copies = [replace(m, module=own[m.name]) for m in tracked]
        self.parameters: list[torch.nn.Parameter] = ParameterLayout(copies).parameters
        self.damping = proximal_damping(copies, damping, self.parameters)
        self.module_damping = {spec.name: float(damping[spec.name]) for spec in tracked}
        self.start = [p.detach().clone() for p in self.parameters]
        self._start_log_prob = torch.zeros((), dtype=torch.float64)
        self.device = next(self.model.parameters()).device
        self.sample = [batch.to(self.device) for batch in sample]
        self.num_sequences = sum(len(batch.ids) for batch in self.sample)
        if self.num_sequences == 0:
            raise ValueError("the PBRF objective needs at least one fit sequence")
        with torch.no_grad():
            self.reference = [self._logits(batch) for batch in self.sample]

    def _logits(self, batch: TokenBatch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]

    def reset(self) -> None:
        with torch.no_grad():
            for parameter, start in zip(self.parameters, self.start):
                parameter.copy_(start)

    def bregman(self) -> torch.Tensor:
        """``(1/N) sum_n sum_t KL(p(theta_s) || p(theta))`` over the sample's target positions.

        With ``d = logits - logits_s`` and ``u = d - p_s . d``,
        ``KL = log sum_v p_s,v exp(u_v) = log1p(sum_v p_s,v (expm1(u_v) - u_v))`` (as ``p_s . u = 0``):
        computed from the small ``u`` rather than as a difference of two log-probabilities, it keeps
        its relative precision when the divergence is of order epsilon^2, which the line search needs.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, reference in zip(self.sample, self.reference):
            probabilities = torch.softmax(reference, dim=-1)
            shift = self._logits(batch) - reference
            centred = shift - (probabilities * shift).sum(-1, keepdim=True)
            divergence = torch.log1p((probabilities * (torch.expm1(centred) - centred)).sum(-1))
            total = total + torch.where(batch.target_mask[:, 1:], divergence, torch.zeros_like(divergence)).sum()
        return total / self.num_sequences

    def proximity(self) -> torch.Tensor:
        return sum(0.5 * (damping * (parameter - start).square()).sum()
                   for parameter, start, damping in zip(self.parameters, self.start, self.damping))

    def log_prob(self, batch: TokenBatch) -> torch.Tensor:
        """Per item of ``batch``: the sum over its target positions of log p (``log p(z)``, or ``m(q)``)."""
        batch = batch.to(self.device)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_log_prob(logits, batch)

    def value(self, document: TokenBatch, weight: float) -> torch.Tensor:
        """The objective less its value at theta_s (a constant), so that it is of order epsilon^2 and
        the line search compares numbers of that size."""
        up_weighted = self.log_prob(document).sum() - self._start_log_prob
        return self.bregman() - weight * up_weighted + self.proximity()

    def gradient_norm(self, document: TokenBatch, weight: float) -> float:
        with only_these_require_grad(self.model, self.parameters), torch.enable_grad():
            gradients = torch.autograd.grad(self.value(document, weight), self.parameters)
        return float(torch.sqrt(sum(g.square().sum() for g in gradients)))

    def solve(self, document: TokenBatch, weight: float, steps: int, tolerance: float) -> PbrfSolve:
        """Minimise from theta_s (left at the minimiser found): at most ``steps`` L-BFGS iterations,
        stopping once the largest gradient entry is below ``tolerance`` times the one at theta_s."""
        started = time.perf_counter()
        self.reset()
        with torch.no_grad():
            self._start_log_prob = self.log_prob(document).sum()
        evaluations = 0
        with only_these_require_grad(self.model, self.parameters), torch.enable_grad():
            initial = torch.autograd.grad(self.value(document, weight), self.parameters)
            initial_norm = float(torch.sqrt(sum(g.square().sum() for g in initial)))
            largest = max(float(g.abs().max()) for g in initial)
            optimizer = torch.optim.LBFGS(self.parameters, lr=1.0, max_iter=steps, max_eval=2 * steps,
                                          tolerance_grad=tolerance * largest, tolerance_change=0.0,
                                          history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                nonlocal evaluations
                evaluations += 1
                optimizer.zero_grad(set_to_none=True)
                loss = self.value(document, weight)
                loss.backward()
                return loss

            optimizer.step(closure)
            iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
        remaining = self.gradient_norm(document, weight)
        for parameter in self.parameters:
            parameter.grad = None
        return PbrfSolve(iterations, evaluations, remaining / max(initial_norm, 1e-300), time.perf_counter() - started)

    @torch.no_grad()
    def measure(self, queries: TokenBatch) -> torch.Tensor:
        return self.log_prob(queries)


def pbrf_responses(objective: ProximalObjective, document: TokenBatch, queries: TokenBatch, epsilon: float, steps: int,
                   tolerance: float) -> PbrfResponse:
    """R(q, z) for one document (a batch of one) and every query of ``queries``."""
    if len(document.ids) != 1:
        raise ValueError("the PBRF up-weights one document at a time")
    objective.reset()
    before = objective.measure(queries)
    solve = objective.solve(document, epsilon, steps, tolerance)
    after = objective.measure(queries)
    objective.reset()
    return PbrfResponse(document.ids[0], ((after - before) / epsilon).tolist(), solve)
