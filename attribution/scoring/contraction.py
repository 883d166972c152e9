"""Three ways to contract a document's (a, ds) with Q queries' factors, and a cost model to pick one.

For document z and module m, ``<L R^T, dW(z)> = sum_t (L^T ds_t) . (R^T a_t) = sum_{i,k} L_ik (dW(z) R)_ik``:

- ``low_rank``: project every token's ``ds_t`` and ``a_t`` onto the stacked query
  factors; cost per sequence ``T (d_out + d_in') Q r``, and token-wise scores come free.
- ``document_low_rank``: form ``dW(z) = sum_t ds_t a_t^T``, multiply it by the stacked ``R`` and
  dot the result with ``L``; cost per sequence ``(T + Q r) d_out d_in'``, no memory beyond the
  factors and one (d_out, Q r) product per sequence. Cheaper than ``low_rank`` for long sequences.
- ``per_document``: form ``dW(z)`` and dot it with the dense ``L R^T``; cost per sequence
  ``(T + Q) d_out d_in'`` and memory ``Q d_out d_in'`` for the dense factors.

All compute the same number on the same rank-r factors. With ``score.normalize`` each also adds the
document's squared gradient norm ``||dW(z)||_F^2`` (:func:`gradient_square_norms`), from ``dW(z)`` where
its contraction forms it. Each can be limited to some of the queries (a prefiltered batch needs only
those whose candidates it holds): the ``Q`` in every cost above becomes their number.
"""

from __future__ import annotations

from typing import Literal

import torch

from attribution.scoring.query_factors import ModuleQueryFactors

Contraction = Literal["low_rank", "document_low_rank", "per_document"]


def contraction_costs(d_in: int, d_out: int, num_queries: int, rank: int, tokens: int) -> dict[Contraction, int]:
    """Multiply-adds of each contraction for one sequence of ``tokens`` tokens."""
    return {"low_rank": tokens * (d_in + d_out) * num_queries * rank,
            "document_low_rank": (tokens + num_queries * rank) * d_in * d_out,
            "per_document": (tokens + num_queries) * d_in * d_out}


def choose_contraction(d_in: int, d_out: int, num_queries: int, rank: int, tokens: int) -> Contraction:
    """The cheapest contraction in multiply-adds for sequences of ``tokens`` tokens, memory aside."""
    costs = contraction_costs(d_in, d_out, num_queries, rank, tokens)
    return min(costs, key=lambda name: (costs[name], name != "per_document"))


def _factored(costs: dict[Contraction, int]) -> Contraction:
    """The cheaper of the two contractions that need no dense factors."""
    return "document_low_rank" if costs["document_low_rank"] < costs["low_rank"] else "low_rank"


def plan_contractions(
    shapes: dict[str, tuple[int, int, int]], num_queries: int, tokens: int, element_bytes: int, budget_bytes: float | None
) -> dict[str, Contraction]:
    """Per module (``name -> (d_in', d_out, rank)``), the contraction to use.

    Every module gets the cheaper of the two factored contractions; the per-document one holds
    ``Q d_out d_in'`` dense factor elements per module, so within ``budget_bytes`` (None: no
    limit) the modules where it saves the most multiply-adds per byte get it instead.
    """
    plan: dict[str, Contraction] = {}
    savings = []
    for name, (d_in, d_out, rank) in shapes.items():
        costs = contraction_costs(d_in, d_out, num_queries, rank, tokens)
        plan[name] = _factored(costs)
        if costs["per_document"] < costs[plan[name]]:
            size = num_queries * d_in * d_out * element_bytes
            savings.append(((costs[plan[name]] - costs["per_document"]) / size, size, name))
    spent = 0.0
    for _, size, name in sorted(savings, reverse=True):
        if budget_bytes is None or spent + size <= budget_bytes:
            plan[name] = "per_document"
            spent += size
    return plan


class ModuleContraction:
    """One module's query factors, laid out for the chosen contraction."""

    def __init__(self, factors: ModuleQueryFactors, contraction: Contraction) -> None:
        self.contraction = contraction
        self.num_queries, _, self.rank = factors.left.shape
        # (Q, d, r): a subset of the queries is one index_select away.
        self.lefts, self.rights = factors.left, factors.right
        # (d, Q r): one matmul projects a token onto every query's factors at once.
        self.left = factors.left.permute(1, 0, 2).flatten(1)
        self.right = factors.right.permute(1, 0, 2).flatten(1)
        # (Q, d_out d_in'): the dot products of Q queries with a flattened gradient are one matmul.
        self.dense = factors.dense().flatten(1) if contraction == "per_document" else None

    def _stacked(self, queries: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(left, right, Q')``: the (d, Q' r) stacks of the selected queries (all: None)."""
        if queries is None:
            return self.left, self.right, self.num_queries
        return (self.lefts.index_select(0, queries).permute(1, 0, 2).flatten(1),
                self.rights.index_select(0, queries).permute(1, 0, 2).flatten(1), len(queries))

    def token_scores(self, activations: torch.Tensor, output_gradients: torch.Tensor,
                     queries: torch.Tensor | None = None) -> torch.Tensor:
        """``(L_q^T ds_t) . (R_q^T a_t)`` per token and query: (B, T, Q), or (B, T, Q') for the ``queries`` given."""
        left, right, count = self._stacked(queries)
        products = ((activations @ right) * (output_gradients @ left)).unflatten(-1, (count, self.rank))
        return products.sum(-1)

    def scores(self, activations: torch.Tensor, output_gradients: torch.Tensor,
               square_norms: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``<L_q R_q^T, dW(z)>`` per document and query: (B, Q), or (B, Q') for the ``queries`` given (indices);
        ``||dW(z)||_F^2`` added into ``square_norms`` (B,) when given."""
        if self.contraction == "low_rank":
            if square_norms is not None:
                square_norms += gradient_square_norms(activations, output_gradients)
            return self.token_scores(activations, output_gradients, queries).sum(1)
        # Explicit (b)mm: torch.einsum picked a path an order of magnitude slower on CPU here.
        per_document_gradient = output_gradients.mT @ activations
        if square_norms is not None:
            square_norms += per_document_gradient.square().sum((1, 2))
        if self.dense is not None:
            dense = self.dense if queries is None else self.dense.index_select(0, queries)
            return per_document_gradient.flatten(1) @ dense.T
        left, right, count = self._stacked(queries)
        projected = (per_document_gradient @ right) * left  # (B, d_out, Q' r)
        return projected.sum(1).unflatten(-1, (count, self.rank)).sum(-1)


def gradient_square_norms(activations: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """``||dW(z)||_F^2 = ||sum_t ds_t a_t^T||_F^2`` per document of (B, T, d_in') ``a`` and (B, T, d_out) ``ds``: (B,).

    The cheaper of forming ``dW(z)`` (``T d_out d_in'`` per sequence) and the token Gram matrices,
    ``sum_{t,t'} (a_t . a_t') (ds_t . ds_t')`` (``T^2 (d_in' + d_out)``), one sequence at a time, so the
    largest temporary is one (d_out, d_in') gradient or two (T, T) Gram matrices.
    """
    tokens, d_in = activations.shape[1:]
    d_out = output_gradients.shape[-1]
    result = torch.empty(activations.shape[0], dtype=activations.dtype, device=activations.device)
    for b in range(activations.shape[0]):
        a, ds = activations[b], output_gradients[b]
        if tokens * (d_in + d_out) < d_in * d_out:
            result[b] = ((a @ a.T) * (ds @ ds.T)).sum()
        else:
            result[b] = (ds.T @ a).square().sum()
    return result
