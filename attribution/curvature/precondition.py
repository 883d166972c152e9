"""The inverse-damped-curvature-vector product used by scoring.

For a module gradient V (d_out x d_in') and factors in eigen-form,

    (G + lambda I)^{-1} vec(V) = vec( Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T ),

a division in the Kronecker eigenbasis; ``/`` is elementwise. The three steps are also exposed
one by one, so a query's factors can be compressed in the eigenbasis and only its rank-r factors
rotated back (see :meth:`Stages.query_factors`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from attribution.curvature.factors import ModuleFactors, default_damping
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.store import FactorSet, FactorStoreError


class Preconditioner:
    """Applies ``(G_m + lambda_m I)^{-1}`` per module for one factor set."""

    def __init__(
        self,
        factors: FactorSet,
        damping: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        reload: Callable[[], FactorSet] | None = None,
    ) -> None:
        self.strategy = factors.manifest.strategy
        self._device, self._dtype, self._reload = device, dtype, reload
        self._modules: dict[str, ModuleFactors] = {name: f.to(device, dtype) for name, f in factors.modules.items()}
        self.damping = {name: default_damping(f, self.strategy, damping) for name, f in self.modules.items()}
        # The diagonal and identity strategies store identity bases: rotating by them is wasted work.
        self.rotates = self.strategy not in ("diagonal", "identity")
        for name, value in self.damping.items():
            eigenvalues = self.modules[name].corrected_eigenvalues
            if self.strategy != "identity" and value <= 0 and bool((eigenvalues <= 0).any()):
                unseen = "" if eigenvalues.any() else " (all are 0: no token of the fit sample reached it, an expert its router never chose?)"
                raise FactorStoreError(f"module {name}: damping {value} leaves a zero or negative eigenvalue{unseen}; "
                                       "use factors.damping > 0")

    @property
    def modules(self) -> dict[str, ModuleFactors]:
        """Every module's factors, read again from the store if :meth:`release` let them go."""
        if not self._modules and self._reload is not None:
            self._modules.update({name: f.to(self._device, self._dtype) for name, f in self._reload().modules.items()})
        return self._modules

    def release(self) -> None:
        """Let the factors go until they are next needed (the candidate pass needs only the queries' factors:
        at 8B the eigen-form is about 130 GiB). Copies made by :meth:`with_damping_scaled` share them."""
        if self._reload is not None:
            self._modules.clear()

    def with_damping_scaled(self, factor: float) -> Preconditioner:
        """The same factors with every module's damping multiplied by ``factor``."""
        scaled = copy.copy(self)
        scaled.damping = {name: factor * value for name, value in self.damping.items()}
        return scaled

    def damping_vector(self, layout: ParameterLayout, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """The per-module damping as a (P,) vector of ``layout``: the diagonal D of ``G + D``."""
        return torch.cat([torch.full((size,), self.damping[m.name], dtype=dtype, device=device)
                          for m, size in zip(layout.tracked, layout.sizes)])

    def apply_flat(self, vectors: torch.Tensor, layout: ParameterLayout) -> torch.Tensor:
        """``(G_hat + D)^{-1} v`` for (Q, P) vectors of ``layout``, module by module, in ``vectors``' dtype,
        each module's result written into its view of one new (Q, P) tensor."""
        result = torch.empty_like(vectors)
        for (name, matrices), out in zip(layout.split(vectors).items(), layout.split(result).values()):
            out.copy_(self.apply(name, matrices))
        return result

    def apply(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^{-1} V`` for V of shape (..., d_out, d_in'), batched over leading dimensions."""
        return self.from_eigenbasis(name, self.divide(name, self.to_eigenbasis(name, gradient)))

    def to_eigenbasis(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """``Q_S^T V Q_A`` (the identity for the diagonal and identity strategies, whose bases are I)."""
        factors = self.modules[name]
        gradient = gradient.to(factors.activation_eigenvectors.dtype)
        if not self.rotates:
            return gradient
        return factors.gradient_eigenvectors.T @ gradient @ factors.activation_eigenvectors

    def tokens_to_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``Q_S^T V Q_A`` of ``V = sum_t ds_t a_t^T`` from its (B, T, d_out) and (B, T, d_in') factors,
        ``(ds Q_S)^T (a Q_A)``: for T tokens it costs ``T (d_out^2 + d_in'^2 + d_out d_in')`` instead of
        ``d_out d_in' (d_out + d_in')``."""
        factors = self.modules[name]
        dtype = factors.activation_eigenvectors.dtype
        output_gradients, activations = output_gradients.to(dtype), activations.to(dtype)
        if not self.rotates:
            return output_gradients.mT @ activations
        return (output_gradients @ factors.gradient_eigenvectors).mT @ (activations @ factors.activation_eigenvectors)

    def divide(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """``R / (Lambda + lambda)``, the inverse in the Kronecker eigenbasis."""
        return rotated / (self.modules[name].corrected_eigenvalues + self.damping[name])

    def from_eigenbasis(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """``Q_S X Q_A^T``."""
        if not self.rotates:
            return rotated
        factors = self.modules[name]
        return factors.gradient_eigenvectors @ rotated @ factors.activation_eigenvectors.T

    def factors_from_eigenbasis(self, name: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_S L, Q_A R)``: a low-rank ``L R^T`` in the eigenbasis as factors in the parameter basis."""
        if not self.rotates:
            return left, right
        factors = self.modules[name]
        return factors.gradient_eigenvectors @ left.to(factors.gradient_eigenvectors.dtype), \
            factors.activation_eigenvectors @ right.to(factors.activation_eigenvectors.dtype)
