"""Preconditioned query gradients, compressed per module to rank r.

For query q and module m, with ``m(q) = log p(completion | prompt)``,

    P_{q,m} = (G_m + lambda_m I)^{-1} grad_{W_m} m(q)  ~=  L_{q,m} R_{q,m}^T,

where ``L = U_r diag(s_r)`` (d_out x r) and ``R = V_r`` (d_in' x r) come from the SVD of
``P_{q,m}``. A candidate's score is then ``sum_m <L_{q,m} R_{q,m}^T, dW_m(z)>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from attribution.curvature.capture import GradientCapture
from attribution.data.batching import TokenBatch
from attribution.log_prob import backward_log_prob
from attribution.models import TrackedModule

# Beyond this fraction of the full rank an exact SVD costs little more than a randomized one.
RANDOMIZED_SVD_MAX_FRACTION = 0.25
RANDOMIZED_SVD_OVERSAMPLING = 10
RANDOMIZED_SVD_ITERATIONS = 2

Precondition = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class ModuleQueryFactors:
    """Stacked low-rank factors of Q queries' preconditioned gradients for one module."""

    left: torch.Tensor  # (Q, d_out, r) = U diag(s)
    right: torch.Tensor  # (Q, d_in', r) = V

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def dense(self) -> torch.Tensor:
        """``L R^T`` for every query, (Q, d_out, d_in')."""
        return self.left @ self.right.mT

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ModuleQueryFactors:
        return ModuleQueryFactors(self.left.to(device, dtype), self.right.to(device, dtype))


    def rows(self, keep: torch.Tensor) -> ModuleQueryFactors:
        """The factors of the queries where ``keep`` (Q,) is true."""
        keep = keep.to(self.left.device)
        return ModuleQueryFactors(self.left[keep], self.right[keep])


@dataclass
class QueryFactors:
    query_ids: list[str]
    modules: dict[str, ModuleQueryFactors]


TokenGradients = tuple[torch.Tensor, torch.Tensor]
TokenGradientCallback = Callable[[str, torch.Tensor, torch.Tensor], None]


def each_token_gradient(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batch: TokenBatch,
    use: TokenGradientCallback,
    dtype: torch.dtype = torch.float64,
) -> None:
    """One backward pass of ``sum_n log p(x_n)`` over target positions; ``use(name, ds, a)`` gets each
    module's factors as autograd produces them: output gradients ``ds`` (B, T, d_out) and inputs ``a``
    (B, T, d_in') with padding zeroed, so that the gradient is ``dW = ds^T a`` (B, d_out, d_in').
    A caller that reduces them at once never holds every module's factors together."""
    mask = batch.attention_mask.to(dtype).unsqueeze(-1)

    def hand_over(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
        use(module.name, output_gradients, activations * mask)

    with GradientCapture(model, tracked, hand_over, dtype=dtype):
        backward_log_prob(model, batch, tracked=tracked)


def per_token_gradients(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batch: TokenBatch,
    dtype: torch.dtype = torch.float64,
) -> dict[str, TokenGradients]:
    """Every module's ``(ds, a)`` of :func:`each_token_gradient`, by name."""
    factors: dict[str, TokenGradients] = {}
    each_token_gradient(model, tracked, batch, lambda name, ds, a: factors.__setitem__(name, (ds, a)), dtype)
    return factors


def per_sequence_gradients(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batch: TokenBatch,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``grad_W sum_t log p(x_t | x_<t)`` over target positions, per sequence and module: (B, d_out, d_in')."""
    return {name: ds.mT @ a for name, (ds, a) in per_token_gradients(model, tracked, batch, dtype).items()}


def compress(matrices: torch.Tensor, rank: int | None, seed: int = 0) -> ModuleQueryFactors:
    """Best rank-r approximation ``L R^T`` of each (d_out, d_in') matrix of a (Q, d_out, d_in') stack.

    ``rank=None`` (or at least min(d_out, d_in')) keeps the exact matrix. Small ranks of large
    matrices use a randomized SVD (Halko et al. 2011), batched over the stack: with a Gaussian
    ``Omega`` (d_in' x (r + p)), ``Y = (A A^T)^k A Omega`` orthonormalised after every product,
    ``B = Q_Y^T A``, and ``A ~= Q_Y U_B S_B V_B^T``; otherwise one batched exact SVD.
    """
    full_rank = min(matrices.shape[-2:])
    if rank is None or rank >= full_rank:
        rank = full_rank
    if rank > RANDOMIZED_SVD_MAX_FRACTION * full_rank:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return ModuleQueryFactors(u[..., :rank] * s[:, None, :rank], vh[:, :rank].mT)
    width = min(rank + RANDOMIZED_SVD_OVERSAMPLING, full_rank)
    generator = torch.Generator(device=matrices.device).manual_seed(seed)
    omega = torch.randn(matrices.shape[-1], width, generator=generator, device=matrices.device, dtype=matrices.dtype)
    basis = torch.linalg.qr(matrices @ omega).Q
    for _ in range(RANDOMIZED_SVD_ITERATIONS):
        basis = torch.linalg.qr(matrices @ torch.linalg.qr(matrices.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ matrices, full_matrices=False)
    return ModuleQueryFactors((basis @ u[..., :rank]) * s[:, None, :rank], vh[:, :rank].mT)


def concatenate(parts: list[QueryFactors]) -> QueryFactors:
    """The queries of several batches as one set, in batch order (batches with no kept query add none)."""
    parts = [part for part in parts if part.query_ids]
    if not parts:
        return QueryFactors([], {})
    names = list(parts[0].modules)
    modules = {
        name: ModuleQueryFactors(torch.cat([p.modules[name].left for p in parts]), torch.cat([p.modules[name].right for p in parts]))
        for name in names
    }
    return QueryFactors([query_id for part in parts for query_id in part.query_ids], modules)


def factorise(
    query_ids: Sequence[str],
    preconditioned: Mapping[str, torch.Tensor],
    rank: int | None,
    to_parameters: Callable[[str, ModuleQueryFactors], ModuleQueryFactors] | None = None,
) -> tuple[QueryFactors, list[str]]:
    """Rank-r factors of the queries whose preconditioned gradients {name: (Q, d_out, d_in')} are finite,
    and the ids of the others. ``to_parameters`` maps each module's factors to the parameter basis
    when the matrices are given in another orthonormal basis (the compression commutes with it)."""
    finite = torch.ones(len(query_ids), dtype=torch.bool)
    for matrices in preconditioned.values():
        finite &= torch.isfinite(matrices).flatten(1).all(1).cpu()
    kept = [query_id for query_id, ok in zip(query_ids, finite.tolist()) if ok]
    rejected = [query_id for query_id, ok in zip(query_ids, finite.tolist()) if not ok]
    if not kept:
        return QueryFactors([], {}), rejected
    rows = finite.to(next(iter(preconditioned.values())).device)
    modules = {name: compress(matrices[rows], rank) for name, matrices in preconditioned.items()}
    if to_parameters is not None:
        modules = {name: to_parameters(name, factors) for name, factors in modules.items()}
    return QueryFactors(kept, modules), rejected


def query_factors(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batch: TokenBatch,
    precondition: Precondition,
    rank: int | None,
    dtype: torch.dtype = torch.float64,
) -> tuple[QueryFactors, list[str]]:
    """Factors of the queries whose gradients, preconditioned module by module, are finite, and the
    ids of those that were not."""
    gradients = per_sequence_gradients(model, tracked, batch, dtype)
    return factorise(batch.ids, {name: precondition(name, g) for name, g in gradients.items()}, rank)
