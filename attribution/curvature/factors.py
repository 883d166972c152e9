"""Per-module curvature factors and how each strategy derives them.

Every strategy is stored in the same eigen-form, so one preconditioner serves all:

    G_m ~= (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T        (row-major vec of d_out x d_in')

- ``ekfac``: Q_A, Q_S eigenvectors of A and S; Lambda re-fitted in that basis (eigenvalue pass).
- ``kfac``: the same eigenvectors, Lambda = lambda_S lambda_A^T, i.e. G = S (x) A exactly.
- ``diagonal``: Q = I, Lambda = mean over sequences of dW^2 (the diagonal of G).
- ``identity``: Q = I, Lambda = 1, and no damping: the gradient dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from attribution.curvature.strategies import STRATEGIES, Strategy

NEEDS_COVARIANCE_PASS = {"ekfac": True, "kfac": True, "diagonal": True, "identity": False}
NEEDS_EIGENVALUE_PASS = {"ekfac": True, "kfac": False, "diagonal": True, "identity": False}


@dataclass
class ModuleFactors:
    """The five tensors of one module's factor file (SPEC "Factor store").

    The covariances are None when loaded for scoring, which needs only the eigen-form (they are
    two fifths of a store's bytes at MLP widths).
    """

    activation_covariance: torch.Tensor | None  # A, (d_in', d_in')
    gradient_covariance: torch.Tensor | None  # S, (d_out, d_out)
    activation_eigenvectors: torch.Tensor  # Q_A
    gradient_eigenvectors: torch.Tensor  # Q_S
    corrected_eigenvalues: torch.Tensor  # Lambda, (d_out, d_in')

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors present, by name."""
        return {f.name: tensor.contiguous() for f in fields(self) if (tensor := getattr(self, f.name)) is not None}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ModuleFactors:
        return ModuleFactors(**{f.name: None if (tensor := getattr(self, f.name)) is None else tensor.to(device=device, dtype=dtype)
                                for f in fields(self)})


def check_strategy(strategy: str) -> Strategy:
    if strategy not in STRATEGIES:
        raise ValueError(f"factors.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy  # type: ignore[return-value]


def eigenvectors(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric covariance, computed in float64.

    Symmetrised in place on one float64 copy: at d = 14,336 each copy is 1.6 GiB.
    """
    symmetric = covariance.T.to(torch.float64, copy=True)
    symmetric.add_(covariance).mul_(0.5)
    values, vectors = torch.linalg.eigh(symmetric)
    return values, vectors.contiguous()


def identity_factors(d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str) -> ModuleFactors:
    eye_in = torch.eye(d_in, dtype=dtype, device=device)
    eye_out = torch.eye(d_out, dtype=dtype, device=device)
    return ModuleFactors(eye_in, eye_out, eye_in, eye_out, torch.ones(d_out, d_in, dtype=dtype, device=device))


def default_damping(factors: ModuleFactors, strategy: Strategy, damping: float | None) -> float:
    """``lambda = damping`` if given, else 0.1 x mean(Lambda); the gradient dot product has none."""
    if strategy == "identity":
        return 0.0
    if damping is not None:
        return float(damping)
    return 0.1 * factors.corrected_eigenvalues.to(torch.float64).mean().item()
