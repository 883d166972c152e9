"""Kronecker random projections of weight gradients, and their inner products.

For a tracked module with weight gradient ``dW = sum_t ds_t a_t^T`` (``d_out x d_in'``), the
sketch is

    S(dW) = P_out dW P_in^T = sum_t (P_out ds_t)(P_in a_t)^T          (k x k)

with ``P_out`` (k x d_out) and ``P_in`` (k x d_in') drawn from a seed and the module's name: k
random orthonormal rows scaled by ``sqrt(d / k)`` (the first k columns of a Haar-random rotation),
or, when ``k >= d``, the identity padded with zero rows. It is formed from the per-token factors,
never from ``dW``. Because ``E[P^T P] = I`` for each projection (exactly ``I`` when ``k >= d``),
and the two are independent,

    E <S(A), S(B)>_F = <A, B>_F,

so a query's sketched preconditioned gradient dotted with a document's sketched gradient is an
unbiased estimate of their influence score. For projections of independent N(0, 1/k) entries its
variance is

    Var <S(A), S(B)> = ( ||A^T B||^2 + tr((A^T B)^2) + ||B A^T||^2 + tr((B A^T)^2) ) / k
                     + ( ||A||^2 ||B||^2 + ||A B^T||^2 + ||A^T B||^2 + <A, B>^2 ) / k^2

(:func:`sketch_variance`); orthonormal rows never repeat a direction, which only lowers it, to 0
for a side with ``k >= d``. Each module has its own projections, so the modules' errors are
independent and the variances add.

Whitening keeps the estimate unbiased and shrinks its spread: for any invertible ``M_out``,
``M_in``, ``<M_out X M_in^T, M_out^{-T} G M_in^{-T}> = <X, G>``, so the query side may sketch
``W_S X W_A`` and the document side ``W_S^{-1} dW W_A^{-1}`` (:mod:`attribution.sketch.whitening`).
Folded into the projections (``P_out W_S^{-1}``), it costs nothing per token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from attribution.models import TrackedModule


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed for one module's projections, the same on every machine and process."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class ModuleProjection:
    """``P_out`` (k, d_out) and ``P_in`` (k, d_in') of one module."""

    outputs: torch.Tensor
    inputs: torch.Tensor

    @classmethod
    def draw(cls, seed: int, module: TrackedModule, k: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> ModuleProjection:
        """Both sides from ``(seed, module name)``; drawn in float64 on the CPU so that every device
        and dtype sketches with the same numbers."""
        generator = torch.Generator().manual_seed(module_seed(seed, module.name))
        outputs = orthonormal_rows(k, module.d_out, generator)
        inputs = orthonormal_rows(k, module.d_in_augmented, generator)
        return cls(outputs.to(device, dtype), inputs.to(device, dtype))

    @property
    def k(self) -> int:
        return self.outputs.shape[0]

    def tokens(self, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``sum_t (P_out ds_t)(P_in a_t)^T`` per sequence: ``ds`` (B, T, d_out), ``a`` (B, T, d_in') -> (B, k, k).

        Cost ``T k (d_out + d_in' + k)`` per sequence; the padding rows of ``a`` must be zero."""
        return (output_gradients @ self.outputs.T).mT @ (activations @ self.inputs.T)

    def factors(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``(P_out L)(P_in R)^T`` of low-rank factors ``L R^T``: (Q, d_out, r), (Q, d_in', r) -> (Q, k, k)."""
        return (self.outputs @ left) @ (self.inputs @ right).mT

    def transformed(self, outputs: torch.Tensor, inputs: torch.Tensor) -> ModuleProjection:
        """``(P_out M_out, P_in M_in)``: the sketch of ``M_out W M_in^T``."""
        return ModuleProjection(self.outputs @ outputs.to(self.outputs), self.inputs @ inputs.to(self.inputs))

    def matrix(self, weights: torch.Tensor) -> torch.Tensor:
        """``P_out W P_in^T`` of dense matrices (..., d_out, d_in'): for checks against brute force."""
        return self.outputs @ weights @ self.inputs.T


def orthonormal_rows(k: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(k, d) with ``E[P^T P] = I``: ``sqrt(d / k)`` times k orthonormal rows of a Haar-random
    rotation, or the identity padded with zero rows when ``k >= d``."""
    if k >= d:
        return torch.eye(k, d, dtype=torch.float64)
    gaussian = torch.randn(d, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Signs from R's diagonal make Q Haar-distributed, not just orthonormal.
    return (q * torch.sign(torch.diagonal(r))).T * (d / k) ** 0.5


def projections(seed: int, tracked: list[TrackedModule], k: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, ModuleProjection]:
    return {module.name: ModuleProjection.draw(seed, module, k, device, dtype) for module in tracked}


def sketch_variance(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The variance of ``<S(A), S(B)>`` over N(0, 1/k) projections of size k (module docstring): an upper
    bound for the orthonormal ones."""
    atb, bat = a.T @ b, b @ a.T
    first = (atb.square().sum() + torch.trace(atb @ atb) + bat.square().sum() + torch.trace(bat @ bat)) / k
    second = (a.square().sum() * b.square().sum() + (a @ b.T).square().sum() + atb.square().sum()
              + (a * b).sum().square()) / k**2
    return float(first + second)
