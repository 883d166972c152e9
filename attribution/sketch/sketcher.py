"""Sketch documents' and queries' gradients with one module's projections each, concatenated.

A sketch vector is the row-major flattening of every tracked module's ``k x k`` sketch, in
the order of the tracked modules, so that

    <sketch(q), sketch(z)> = sum_m <S_m(X_q), S_m(dW_m(z))>  ~  sum_m <X_q, dW_m(z)> = I(q, z)

for a query's preconditioned gradient ``X_q`` (its rank-r factors, as scoring uses them) and a
document's gradient of ``log p(z)``: the candidate pass's own score, estimated. With a ``basis``
(:mod:`attribution.sketch.basis`), each module's ``k^2`` numbers are replaced by their C
coordinates in its principal directions, ``V_m^T s_m``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from attribution.curvature.capture import GradientCallback, GradientCapture
from attribution.data.batching import TokenBatch
from attribution.log_prob import backward_log_prob
from attribution.models import TrackedModule
from attribution.scoring.query_factors import QueryFactors
from attribution.sketch.projection import ModuleProjection, projections


class Sketcher:
    """The projections of every tracked module, and the passes that use them.

    With ``whitening`` (per module, :func:`~attribution.sketch.whitening.module_whitening`),
    documents are sketched with ``P W^{-1}`` and queries with ``P W``; without, both with ``P``.
    """

    def __init__(self, model: PreTrainedModel, tracked: Sequence[TrackedModule], seed: int, k: int,
                 dtype: torch.dtype = torch.float32, whitening: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.model = model
        self.tracked = list(tracked)
        self.dtype = dtype
        self.k = k
        device = next(model.parameters()).device
        self.basis: dict[str, torch.Tensor] | None = None
        self.projections: dict[str, ModuleProjection] = projections(seed, self.tracked, k, device, dtype)
        self.document_projections = self.query_projections = self.projections
        if whitening is not None:
            self.document_projections = {name: projection.transformed(whitening[name]["inverse_root_outputs"],
                                                                       whitening[name]["inverse_root_inputs"])
                                         for name, projection in self.projections.items()}
            self.query_projections = {name: projection.transformed(whitening[name]["root_outputs"],
                                                                    whitening[name]["root_inputs"])
                                      for name, projection in self.projections.items()}

    @property
    def dim(self) -> int:
        """Numbers per sketch: ``k^2`` a module, or as many as each module's basis has directions."""
        if self.basis is None:
            return len(self.tracked) * self.k * self.k
        return sum(self.basis[module.name].shape[1] for module in self.tracked)

    def with_basis(self, basis: Mapping[str, torch.Tensor]) -> Sketcher:
        """The same projections, compressed by ``basis``."""
        compressed = copy.copy(self)
        device = next(self.model.parameters()).device
        compressed.basis = {name: matrix.to(device, self.dtype) for name, matrix in basis.items()}
        return compressed

    def compress(self, sketches: torch.Tensor) -> torch.Tensor:
        """(N, modules, k, k) -> (N, dim): flattened, or each module's ``V_m^T s_m`` with a basis."""
        if self.basis is None:
            return sketches.flatten(1)
        flat = sketches.flatten(2)
        return torch.cat([self.coordinates(module.name, flat[:, index]) for index, module in enumerate(self.tracked)], dim=1)

    def coordinates(self, module: str, flat: torch.Tensor) -> torch.Tensor:
        """(N, k^2) -> (N, C_m): one module's flattened sketches in its principal directions, ``V_m^T s_m``."""
        assert self.basis is not None
        return flat.to(self.basis[module]) @ self.basis[module]

    def documents(self, batch: TokenBatch) -> torch.Tensor:
        """(B, dim): each document's sketched gradient of ``log p(z)``, from one forward and backward pass."""
        sketches, keep = self.capture(len(batch.ids), batch.input_ids.device)

        def sketch(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
            keep(module, activations * batch.attention_mask.unsqueeze(-1).to(self.dtype), output_gradients)

        with GradientCapture(self.model, self.tracked, sketch, dtype=self.dtype):
            backward_log_prob(self.model, batch, tracked=self.tracked)
        return self.compress(sketches)

    def capture(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, GradientCallback]:
        """(B, modules, k, k) zeros, and the hook that fills module m's slot with ``sum_t (P_out ds_t)(P_in a_t)^T``
        of each document, from the masked inputs ``a`` (B, T, d_in') and output gradients ``ds`` (B, T, d_out)
        a backward pass captured."""
        sketches = torch.zeros(batch_size, len(self.tracked), self.k, self.k, dtype=self.dtype, device=device)
        position = {module.name: index for index, module in enumerate(self.tracked)}

        def keep(module: TrackedModule, activations: torch.Tensor, output_gradients: torch.Tensor) -> None:
            projection = self.document_projections[module.name]
            sketches[:, position[module.name]] = projection.tokens(output_gradients.to(self.dtype), activations.to(self.dtype))

        return sketches, keep

    def queries(self, factors: QueryFactors) -> torch.Tensor:
        """(Q, dim): each query's sketched preconditioned gradient, from its low-rank factors."""
        device = next(self.model.parameters()).device
        parts = []
        for module in self.tracked:
            stacked = factors.modules[module.name].to(device, self.dtype)
            parts.append(self.query_projections[module.name].factors(stacked.left, stacked.right))
        return self.compress(torch.stack(parts, dim=1))
