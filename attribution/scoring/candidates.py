"""Score a batch of candidate documents against every query of a query batch in one forward/backward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from attribution.curvature.capture import GradientCallback, GradientCapture
from attribution.data.batching import TokenBatch
from attribution.log_prob import backward_log_prob
from attribution.models import TrackedModule
from attribution.scoring.contraction import Contraction, ModuleContraction, gradient_square_norms, plan_contractions
from attribution.scoring.query_factors import QueryFactors


class CandidateScorer:
    """Layer-wise and token-wise influence of documents on a fixed set of queries.

    The objective of a document is ``log p(z)`` summed over its tokens; its gradient is
    never formed unless the per-document contraction is the cheaper one for a module.

    ``normalize`` (``score.normalize``): every score of a document, its layer and token parts too, is
    divided by the norm of its gradient over the tracked parameters, ``I(q, z) / ||grad log p(z)||``,
    taken in the same backward pass (:func:`~attribution.scoring.contraction.gradient_square_norms`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tracked: Sequence[TrackedModule],
        factors: QueryFactors,
        expected_tokens: int,
        dtype: torch.dtype = torch.float32,
        dense_budget_mib: float | None = None,
        normalize: bool = False,
    ) -> None:
        self.model = model
        self.normalize = normalize
        self.tracked = list(tracked)
        self.dtype = dtype
        self.query_ids = factors.query_ids
        device = next(model.parameters()).device
        shapes = {m.name: (m.d_in_augmented, m.d_out, factors.modules[m.name].rank) for m in self.tracked}
        budget = None if dense_budget_mib is None else dense_budget_mib * 2**20
        plan = plan_contractions(shapes, len(self.query_ids), expected_tokens, dtype.itemsize, budget)
        self.contractions: dict[str, ModuleContraction] = {
            module.name: ModuleContraction(factors.modules[module.name].to(device, dtype), plan[module.name])
            for module in self.tracked
        }
        self.module_index = {module.name: index for index, module in enumerate(self.tracked)}

    @property
    def plan(self) -> dict[str, Contraction]:
        return {name: c.contraction for name, c in self.contractions.items()}

    def layer_scores(self, batch: TokenBatch, also: GradientCallback | None = None,
                     queries: torch.Tensor | None = None) -> torch.Tensor:
        """``I_m(q, z)`` per document, query and module: (B, Q, M); sums over M to the score. ``also``
        receives each module's masked inputs and output gradients too (the same capture). With
        ``queries`` (indices), only those columns are computed; the others stay zero."""
        device = batch.input_ids.device
        result = torch.zeros(len(batch.ids), len(self.query_ids), len(self.tracked), dtype=self.dtype, device=device)
        squares = self._square_norms(batch)
        columns = slice(None) if queries is None else queries.to(device)

        def contract(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
            masked = activations * batch.attention_mask.unsqueeze(-1).to(self.dtype)
            scores = self.contractions[module.name].scores(masked, output_gradients, squares,
                                                           None if queries is None else columns)
            result[:, columns, self.module_index[module.name]] = scores
            if also is not None:
                also(module, masked, output_gradients)

        self._backward(batch, contract)
        return self._normalized(result, squares)

    def token_scores(self, batch: TokenBatch) -> torch.Tensor:
        """Each token's contribution ``sum_m (L^T ds_t) . (R^T a_t)``: (B, T, Q); sums over T to the score."""
        result = torch.zeros(len(batch.ids), batch.input_ids.shape[1], len(self.query_ids), dtype=self.dtype, device=batch.input_ids.device)
        squares = self._square_norms(batch)

        def contract(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
            masked = activations * batch.attention_mask.unsqueeze(-1).to(self.dtype)
            result.add_(self.contractions[module.name].token_scores(masked, output_gradients))
            if squares is not None:
                squares.add_(gradient_square_norms(masked, output_gradients))

        self._backward(batch, contract)
        return self._normalized(result, squares)

    def _square_norms(self, batch: TokenBatch) -> torch.Tensor | None:
        """(B,) zeros to add each module's ``||dW(z)||_F^2`` into, with ``normalize``."""
        return torch.zeros(len(batch.ids), dtype=self.dtype, device=batch.input_ids.device) if self.normalize else None

    @staticmethod
    def _normalized(result: torch.Tensor, squares: torch.Tensor | None) -> torch.Tensor:
        """``result`` (B, ...) divided by each document's gradient norm (a zero gradient's scores stay zero)."""
        if squares is None:
            return result
        norms = squares.sqrt().clamp_min(torch.finfo(result.dtype).tiny)
        return result / norms.view(-1, *[1] * (result.dim() - 1))

    def _backward(self, batch: TokenBatch, contract) -> None:
        with GradientCapture(self.model, self.tracked, contract, dtype=self.dtype):
            backward_log_prob(self.model, batch, tracked=self.tracked)


def ghost_pass(model: PreTrainedModel, tracked: Sequence[TrackedModule], batch: TokenBatch) -> None:
    """One forward and backward of ``batch`` through the same capture as a scoring pass, its result
    discarded: a worker of a sharded model with nothing to score takes part in the others' gathers."""
    with GradientCapture(model, tracked, _discard):
        backward_log_prob(model, batch, tracked=tracked)


def _discard(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
    """A ghost pass's module inputs and output gradients are not needed."""
