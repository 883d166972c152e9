"""Conjugate gradient for ``(G + lambda_k I) x_k = b``, every damping ``lambda_k`` from one Krylov space.

The Krylov space ``span{b, G b, G^2 b, ...}`` does not depend on the shift, so one
sequence of products ``G p`` serves every damping (multi-shift CG, Jegerlehner 1996).
Plain CG runs on the smallest damping ``lambda_0``; the shifted systems, with
``s_k = lambda_k - lambda_0 >= 0``, keep residuals collinear with the base one,
``r^k_i = zeta^k_i r_i``, where (``alpha_{-1} = 1``, ``beta_{-1} = 0``, ``zeta_{-1} = zeta_0 = 1``)

    zeta^k_{i+1} = zeta^k_i zeta^k_{i-1} alpha_{i-1}
                   / (alpha_i beta_{i-1} (zeta^k_{i-1} - zeta^k_i) + zeta^k_{i-1} alpha_{i-1} (1 + s_k alpha_i)),
    alpha^k_i = alpha_i zeta^k_{i+1} / zeta^k_i,      beta^k_i = beta_i (zeta^k_{i+1} / zeta^k_i)^2,
    x^k_{i+1} = x^k_i + alpha^k_i p^k_i,              p^k_{i+1} = zeta^k_{i+1} r_{i+1} + beta^k_i p^k_i.

A larger shift converges no slower than the base, so the base system sets the stopping
point. Columns of a (Q, P) right-hand side are independent systems solved side by
side; a column stops being multiplied once all its shifts have converged.

A snapshot of each damping's solution per column is kept when it first meets a looser tolerance
(by default 10x the final one; NaN for a column that never does): how much the scores still move between the two says
whether the stopping tolerance is tight enough.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CGResult:
    """Solutions per damping, and how well they satisfy their systems."""

    dampings: list[float]
    solutions: torch.Tensor  # (K, Q, P), K = len(dampings)
    iterations: list[int]  # per column
    relative_residuals: torch.Tensor  # (K, Q), ||b - (G + lambda_k) x_k|| / ||b||, recomputed at the end
    history: list[float] = field(default_factory=list)  # per iteration: the largest base residual of the active columns
    snapshot: torch.Tensor | None = None  # (K, Q, P) at the looser snapshot tolerance
    snapshot_tolerance: float | None = None

    def solution(self, damping: float) -> torch.Tensor:
        return self.solutions[self.dampings.index(damping)]


def multi_shift_cg(
    operator: Operator,
    right_hand_sides: torch.Tensor,
    dampings: Sequence[float],
    tolerance: float = 1e-4,
    max_iterations: int = 1000,
    check_residuals: bool = True,
    snapshot_factor: float | None = 10.0,
    progress: bool = False,
) -> CGResult:
    """Solve ``(G + lambda_k I) x = b`` for every damping and every column of ``b`` (Q, P).

    Stops a column when ``||r^k|| <= tolerance ||b||`` for every k (the recursive
    residual). With ``check_residuals``, the true residuals are recomputed at the end
    (one more product per damping and column). ``snapshot_factor=None`` keeps no snapshot.
    """
    shifts_sorted = sorted(float(d) for d in dampings)
    if shifts_sorted[0] < 0:
        raise ValueError(f"dampings must be non-negative, got {list(dampings)}")
    b = right_hand_sides.to(torch.float64)
    num_columns = b.shape[0]
    base = shifts_sorted[0]
    shifts = torch.tensor([d - base for d in shifts_sorted], dtype=torch.float64, device=b.device)[:, None]  # (K, 1)

    b_norm = b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    r = b.clone()
    rr = (r * r).sum(1)
    x = torch.zeros(len(shifts_sorted), *b.shape, dtype=torch.float64, device=b.device)
    p = b.unsqueeze(0).repeat(len(shifts_sorted), 1, 1)  # p^k_0 = b for every shift; p^0 is the base direction
    zeta = torch.ones(len(shifts_sorted), num_columns, dtype=torch.float64, device=b.device)
    zeta_previous = zeta.clone()
    alpha_previous = torch.ones(num_columns, dtype=torch.float64, device=b.device)
    beta_previous = torch.zeros(num_columns, dtype=torch.float64, device=b.device)
    active = torch.ones(num_columns, dtype=torch.bool, device=b.device)
    iterations = [0] * num_columns
    history = []
    snapshot = None if snapshot_factor is None else torch.zeros_like(x)
    snapped = torch.zeros(len(shifts_sorted), num_columns, dtype=torch.bool, device=b.device)

    bar = tqdm(total=max_iterations, desc="conjugate gradient", unit="it", disable=not progress)
    for _ in range(max_iterations):
        residual = zeta.abs() * rr.sqrt()
        if snapshot is not None:
            # Per damping: a small damping may never meet the looser tolerance that a large one meets.
            newly = (residual <= snapshot_factor * tolerance * b_norm) & ~snapped
            snapshot[newly] = x[newly]
            snapped |= newly
        active &= ~(residual <= tolerance * b_norm).all(0)
        if not bool(active.any()):
            break
        columns = active.nonzero().squeeze(1)
        curvature = operator(p[0, columns]) + base * p[0, columns]
        alpha = rr[columns] / (p[0, columns] * curvature).sum(1)
        a_prev, b_prev = alpha_previous[columns], beta_previous[columns]
        z, z_prev = zeta[:, columns], zeta_previous[:, columns]
        denominator = alpha * b_prev * (z_prev - z) + z_prev * a_prev * (1 + shifts * alpha)
        z_next = z * z_prev * a_prev / denominator
        alpha_shifted = alpha * z_next / z
        x[:, columns] += alpha_shifted[..., None] * p[:, columns]
        r[columns] -= alpha[:, None] * curvature
        rr_next = (r[columns] * r[columns]).sum(1)
        beta = rr_next / rr[columns]
        beta_shifted = beta * (z_next / z) ** 2
        p[:, columns] = z_next[..., None] * r[columns] + beta_shifted[..., None] * p[:, columns]
        zeta_previous[:, columns], zeta[:, columns] = z, z_next
        alpha_previous[columns], beta_previous[columns], rr[columns] = alpha, beta, rr_next
        for column in columns.tolist():
            iterations[column] += 1
        history.append(float((rr[columns].sqrt() / b_norm[columns]).max()))
        bar.update()
        bar.set_postfix(active=len(columns), residual=f"{history[-1]:.1e}")
    bar.close()

    if snapshot is not None:
        # A column that never met the snapshot tolerance has no snapshot: NaN, not its last
        # iterate (which would claim a perfect stability).
        snapshot[~snapped] = float("nan")
    residuals = torch.full((len(shifts_sorted), num_columns), float("nan"), dtype=torch.float64)
    if check_residuals:
        for k, damping in enumerate(shifts_sorted):
            true_residual = b - operator(x[k]) - damping * x[k]
            residuals[k] = (true_residual.norm(dim=1) / b_norm).cpu()
    snapshot_tolerance = None if snapshot_factor is None else snapshot_factor * tolerance
    return CGResult(shifts_sorted, x, iterations, residuals, history, snapshot, snapshot_tolerance)
