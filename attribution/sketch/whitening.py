"""Kronecker whitening of the sketched gradients, from a module's fitted covariances.

With ``W_A = (A + d_A I)^{1/2}`` and ``W_S = (S + d_S I)^{1/2}`` (``A``, ``S`` the module's input
and output-gradient covariances, ``d`` a tenth of each one's mean eigenvalue), documents are
sketched as ``W_S^{-1} dW W_A^{-1}`` and queries as ``W_S X W_A``: their inner product is
unchanged, ``<X, dW>``, but both sides are on the scale of the curvature. Raw, a preconditioned
query ``X ~ G^{-1} g_q`` is large along the directions of small curvature and a document's
gradient along those of large curvature, and the sketch's variance, which grows with
``||X||^2 ||dW||^2``, swamps their product; whitened, both are ``~ G^{-1/2} g`` and the variance
is of the order of the product itself.
"""

from __future__ import annotations

import torch

from attribution.curvature.factors import ModuleFactors

# The damping of each covariance's square root, relative to its mean eigenvalue.
RELATIVE_DAMPING = 0.1


def covariance_roots(covariance: torch.Tensor, eigenvectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C + d I)^{1/2}`` and ``(C + d I)^{-1/2}`` with ``C = Q diag(l) Q^T``, ``l = diag(Q^T C Q)`` clipped
    at 0 and ``d = RELATIVE_DAMPING * mean(l)`` (or 1 for a zero covariance)."""
    q = eigenvectors.double()
    eigenvalues = torch.einsum("ij,ik,kj->j", q, covariance.double(), q).clamp_min(0)
    damping = RELATIVE_DAMPING * float(eigenvalues.mean()) or 1.0
    shifted = eigenvalues + damping
    return (q * shifted.sqrt()) @ q.T, (q * shifted.rsqrt()) @ q.T


def module_whitening(factors: ModuleFactors) -> dict[str, torch.Tensor]:
    """The four matrices of one module: ``root_`` and ``inverse_root_`` of ``outputs`` (S) and ``inputs`` (A)."""
    root_out, inverse_out = covariance_roots(factors.gradient_covariance, factors.gradient_eigenvectors)
    root_in, inverse_in = covariance_roots(factors.activation_covariance, factors.activation_eigenvectors)
    return {"root_outputs": root_out, "inverse_root_outputs": inverse_out, "root_inputs": root_in, "inverse_root_inputs": inverse_in}
