"""LiSSA (Agarwal et al. 2017): a stochastic Neumann series for ``(G + lambda I)^{-1} b``.

With ``A = (G + lambda I) / s`` and ``||A|| < 1``, ``A^{-1} = sum_j (I - A)^j``, so

    x_0 = b,     x_j = b + (1 - lambda / s) x_{j-1} - G_{B_j} x_{j-1} / s,     (G + lambda I)^{-1} b ~= x_J / s,

where ``G_{B_j}`` is the Gauss-Newton matrix of a random mini-batch ``B_j`` (an unbiased
estimate of G). The scale ``s`` must exceed the largest eigenvalue of every ``G_B + lambda``;
the error in a direction of eigenvalue ``e`` shrinks like ``(1 - (e + lambda) / s)^J``, so
small dampings need ``J ~ s / lambda`` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attribution.evaluation.conjugate_gradient import Operator


@dataclass
class LissaResult:
    solution: torch.Tensor  # (Q, P)
    iterations: int
    scale: float
    seconds: float


def largest_eigenvalue(operator: Operator, size: int, iterations: int = 10, seed: int = 0) -> float:
    """Power iteration: the Rayleigh quotient after ``iterations`` products (a lower bound)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    vector /= vector.norm()
    estimate = 0.0
    for _ in range(iterations):
        product = operator(vector).cpu()
        estimate = float(vector @ product)
        vector = product / product.norm()
    return estimate


def lissa(
    minibatch_operator: Callable[[int], Operator],
    right_hand_sides: torch.Tensor,
    damping: float,
    scale: float,
    max_iterations: int | None = None,
    seconds: float | None = None,
) -> LissaResult:
    """Run the recursion until ``max_iterations`` steps or ``seconds`` of wall time, whichever comes first.

    ``minibatch_operator(j)`` is the Gauss-Newton operator of the j-th mini-batch.
    """
    if max_iterations is None and seconds is None:
        raise ValueError("LiSSA needs max_iterations or a time budget")
    started = time.perf_counter()
    b = right_hand_sides.to(torch.float64)
    x = b.clone()
    step = 0
    while (max_iterations is None or step < max_iterations) and (seconds is None or time.perf_counter() - started < seconds):
        curvature = minibatch_operator(step)(x).to(x.device)
        x = b + (1.0 - damping / scale) * x - curvature / scale
        step += 1
    return LissaResult(x / scale, step, scale, time.perf_counter() - started)
