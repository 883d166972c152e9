"""How much of the curvature along the query gradients a per-module approximation can represent.

EK-FAC, K-FAC and the diagonal approximate G by its module-diagonal blocks,
``blockdiag(G_11, ..., G_MM)``. Split a query gradient by module, ``g = (g_1, ..., g_M)``:

    g^T G g = sum_m g_m^T G_mm g_m + sum_{m != n} g_m^T G_mn g_n.

The cross-module share ``1 - sum_m g_m^T G_mm g_m / g^T G g`` is the part of the curvature
along ``g`` that no block-diagonal approximation can hold (negative when cross terms cancel).
``g^T Ĝ g`` of a fitted approximation, over the block-diagonal term, says how much of what it
could hold it does hold. The largest eigenvalue of G lies between the largest of its blocks'
and their sum; far above the fitted factors' largest, it shows modules whose gradients move
together (residual streams).

Cost: M Gauss-Newton products of Q columns (one per module; their sum is also ``G g``),
plus the power iterations of the largest eigenvalue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.curvature.gauss_newton import GaussNewton
from attribution.curvature.store import FactorSet
from attribution.evaluation.lissa import largest_eigenvalue


@dataclass
class CurvatureStructure:
    """Quadratic forms per query, and the largest eigenvalues of G and of the fitted factors."""

    full: torch.Tensor  # (Q,) g^T G g
    block_diagonal: torch.Tensor  # (Q,) sum_m g_m^T G_mm g_m
    fitted: torch.Tensor  # (Q,) g^T Ĝ g of the fitted factors
    largest_eigenvalue: float  # of G, by power iteration (a lower bound)
    largest_fitted_eigenvalue: float  # of Ĝ, the largest corrected eigenvalue of any module

    @property
    def cross_module_share(self) -> float:
        """``1 - sum_m g_m^T G_mm g_m / g^T G g``, averaged over queries."""
        return float((1 - self.block_diagonal / self.full).mean())

    @property
    def fitted_share(self) -> float:
        """``g^T Ĝ g / sum_m g_m^T G_mm g_m``, averaged over queries."""
        return float((self.fitted / self.block_diagonal).mean())

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "cross_module_share": self.cross_module_share,
            "fitted_share_of_block_diagonal": self.fitted_share,
            "largest_eigenvalue": self.largest_eigenvalue,
            "largest_fitted_eigenvalue": self.largest_fitted_eigenvalue,
            "full": self.full.tolist(),
            "block_diagonal": self.block_diagonal.tolist(),
            "fitted": self.fitted.tolist(),
        }

    def describe(self, fitted_name: str) -> str:
        return (f"curvature along the query gradients: {100 * self.cross_module_share:.0f}% in cross-module blocks "
                f"(no per-module method holds it); {fitted_name} holds {100 * self.fitted_share:.0f}% of the "
                f"module-diagonal part; largest eigenvalue of G {self.largest_eigenvalue:.3g}, "
                f"of {fitted_name} {self.largest_fitted_eigenvalue:.3g}")


def curvature_structure(operator: GaussNewton, gradients: torch.Tensor, factors: FactorSet,
                        power_iterations: int = 20, seed: int = 0) -> CurvatureStructure:
    """The quadratic forms of the (Q, P) ``gradients`` of ``operator.layout``; ``factors`` cover its modules."""
    layout = operator.layout
    gradients = gradients.to("cpu", torch.float64)
    product = torch.zeros_like(gradients)
    block_diagonal = torch.zeros(gradients.shape[0], dtype=torch.float64)
    start = 0
    for size in layout.sizes:
        masked = torch.zeros_like(gradients)
        masked[:, start : start + size] = gradients[:, start : start + size]
        module_product = operator(masked).cpu()
        block_diagonal += (masked * module_product).sum(1)
        product += module_product
        start += size
    full = (gradients * product).sum(1)
    fitted = torch.zeros_like(full)
    for name, pieces in layout.split(gradients).items():
        module = factors.modules[name].to("cpu", torch.float64)
        rotated = module.gradient_eigenvectors.T @ pieces @ module.activation_eigenvectors
        fitted += (rotated.square() * module.corrected_eigenvalues).flatten(1).sum(1)
    top = largest_eigenvalue(operator, layout.size, power_iterations, seed)
    top_fitted = max(float(m.corrected_eigenvalues.max()) for m in factors.modules.values())
    return CurvatureStructure(full, block_diagonal, fitted, top, top_fitted)
