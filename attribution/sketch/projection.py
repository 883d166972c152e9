"""Kronecker random projections of weight gradients, and their inner products.

For a tracked module with weight gradient ``dW = sum_t ds_t a_t^T`` (``d_out x d_in'``), the
sketch is

    S(dW) = P_out dW P_in^T = sum_t (P_out ds_t)(P_in a_t)^T          (k x k)

with ``P_out`` (k x d_out) and ``P_in`` (k x d_in') of independent N(0, 1/k) entries, drawn
from a seed and the module's name. It is formed from the per-token factors, never from
``dW``. Because ``E[P^T P] = I`` for each projection, and the two are independent,

    E <S(A), S(B)>_F = <A, B>_F,

and (for Gaussian projections, both of size k)

    Var <S(A), S(B)> = ( ||A^T B||^2 + tr((A^T B)^2) + ||B A^T||^2 + tr((B A^T)^2) ) / k
                     + ( ||A||^2 ||B||^2 + ||A B^T||^2 + ||A^T B||^2 + <A, B>^2 ) / k^2,

so a query's sketched preconditioned gradient dotted with a document's sketched gradient is an
unbiased estimate of their influence score, with a spread that falls as 1/k. Each module has its
own projections, so the modules' errors are independent and the variances add.
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
        """N(0, 1/k) entries from ``(seed, module name)``; drawn in float32 on the CPU so that
        every device and dtype sketches with the same numbers."""
        generator = torch.Generator().manual_seed(module_seed(seed, module.name))
        scale = k ** -0.5
        outputs = torch.randn(k, module.d_out, generator=generator) * scale
        inputs = torch.randn(k, module.d_in_augmented, generator=generator) * scale
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

    def matrix(self, weights: torch.Tensor) -> torch.Tensor:
        """``P_out W P_in^T`` of dense matrices (..., d_out, d_in'): for checks against brute force."""
        return self.outputs @ weights @ self.inputs.T


def projections(seed: int, tracked: list[TrackedModule], k: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, ModuleProjection]:
    return {module.name: ModuleProjection.draw(seed, module, k, device, dtype) for module in tracked}


def sketch_variance(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The variance of ``<S(A), S(B)>`` over Gaussian projections of size k (module docstring)."""
    atb, bat = a.T @ b, b @ a.T
    first = (atb.square().sum() + torch.trace(atb @ atb) + bat.square().sum() + torch.trace(bat @ bat)) / k
    second = (a.square().sum() * b.square().sum() + (a @ b.T).square().sum() + atb.square().sum()
              + (a * b).sum().square()) / k**2
    return float(first + second)
