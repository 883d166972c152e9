"""The inverse-damped-curvature-vector product used by scoring.

For a module gradient V (d_out x d_in') and factors in eigen-form,

    (G + lambda I)^{-1} vec(V) = vec( Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T ),

a division in the Kronecker eigenbasis; ``/`` is elementwise.
"""

from __future__ import annotations

import copy

import torch

from attribution.curvature.factors import ModuleFactors, default_damping
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.store import FactorSet


class Preconditioner:
    """Applies ``(G_m + lambda_m I)^{-1}`` per module for one factor set."""

    def __init__(
        self,
        factors: FactorSet,
        damping: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.strategy = factors.manifest.strategy
        self.modules: dict[str, ModuleFactors] = {name: f.to(device, dtype) for name, f in factors.modules.items()}
        self.damping = {name: default_damping(f, self.strategy, damping) for name, f in self.modules.items()}
        for name, value in self.damping.items():
            if self.strategy != "identity" and value <= 0 and bool((self.modules[name].corrected_eigenvalues <= 0).any()):
                raise ValueError(f"module {name}: damping {value} leaves a zero or negative eigenvalue; use factors.damping > 0")

    def with_damping_scaled(self, factor: float) -> Preconditioner:
        """The same factors with every module's damping multiplied by ``factor``."""
        scaled = copy.copy(self)
        scaled.damping = {name: factor * value for name, value in self.damping.items()}
        return scaled

    def damping_vector(self, layout: ParameterLayout) -> torch.Tensor:
        """The per-module damping as a (P,) vector of ``layout``: the diagonal D of ``G + D``."""
        return torch.cat([torch.full((size,), self.damping[m.name], dtype=torch.float64)
                          for m, size in zip(layout.tracked, layout.sizes)])

    def apply_flat(self, vectors: torch.Tensor, layout: ParameterLayout) -> torch.Tensor:
        """``(G_hat + D)^{-1} v`` for (Q, P) vectors of ``layout``, module by module, in ``vectors``' dtype."""
        pieces = layout.split(vectors)
        return layout.join({name: self.apply(name, matrices).to(vectors.dtype) for name, matrices in pieces.items()})

    def apply(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^{-1} V`` for V of shape (..., d_out, d_in'), batched over leading dimensions."""
        factors = self.modules[name]
        q_a, q_s = factors.activation_eigenvectors, factors.gradient_eigenvectors
        gradient = gradient.to(q_a.dtype)
        rotated = q_s.T @ gradient @ q_a
        scaled = rotated / (factors.corrected_eigenvalues + self.damping[name])
        return q_s @ scaled @ q_a.T
