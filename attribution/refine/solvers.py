"""Iterative solvers for ``(G + D) x = b``, G the Gauss-Newton matrix, D the per-module damping.

Both take the EK-FAC inverse ``M ~= (G + D)^{-1}`` as preconditioner and start from zero, so
their first iterate is the EK-FAC solution along its own direction, ``x_1 = alpha M b``:

- :func:`preconditioned_cg` on a fixed sample. With ``r_0 = b``, ``z_i = M r_i``, ``p_0 = z_0``:

      alpha_i = r_i.z_i / p_i.A p_i,    x_{i+1} = x_i + alpha_i p_i,    r_{i+1} = r_i - alpha_i A p_i,
      beta_i = r_{i+1}.z_{i+1} / r_i.z_i,    p_{i+1} = z_{i+1} + beta_i p_i,        A = G + D.

  ``x_1 = (b.Mb / Mb.A Mb) M b`` is the closed form with its step length chosen by A itself;
  every later iterate minimises the A-norm error over a Krylov space that contains the closed
  form, so at equal products it is never worse than CG started *at* the closed form (whose
  first product only forms ``r_0``).
- :func:`preconditioned_momentum` on mini-batches (the ASTRA iteration, Wang et al. 2025):
  gradient descent with heavy-ball momentum on ``x^T A x / 2 - b^T x`` in the metric of M,

      m_{t+1} = beta m_t + M (b - A_t x_t),      x_{t+1} = x_t + eta_t m_{t+1},

  where ``A_t = G_t + D`` uses mini-batch t's Gauss-Newton matrix. With ``eta_0 = 1`` the first
  step is the closed form ``M b``.

Vectors are (Q, P) columns, one system per column, solved side by side; a column stops being
multiplied once it has converged. Each returns per column the products used, the relative
residual ``||b - A x|| / ||b||`` reached (on the fixed sample for CG; on the evaluation operator
for the momentum iteration) and why it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]

CONVERGED = "converged"
STEP_LIMIT = "step limit"
DIVERGED = "diverged"


@dataclass
class SolveResult:
    """Solutions (Q, P) and, per column, how they were reached."""

    solution: torch.Tensor
    relative_residuals: list[float]
    products: list[int]
    status: list[str]
    # Per step: the relative residual of every column still being solved (NaN once it stopped).
    history: list[list[float]] = field(default_factory=list)
    # The iterate after k steps, for each k asked for (a column that stopped earlier keeps its last).
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per column, the sequences the products passed over (set by the caller, which knows the sample).
    sequence_passes: list[int] = field(default_factory=list)


def _norms(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.norm(dim=1)


def _dots(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of two (C, P) tensors, without a (C, P) temporary."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).view(-1)


def solver_dtype(right_hand_sides: torch.Tensor) -> torch.dtype:
    """The solvers' precision: that of the right-hand sides, at least float32. Ten CG steps to a
    tolerance of 1e-3 lose nothing in float32, and float64 would double every (Q, P) vector (0.45 GiB
    per vector and query at one Llama-3.2-1B block in float64)."""
    return torch.promote_types(right_hand_sides.dtype, torch.float32)


def preconditioned_cg(
    operator: Operator,
    right_hand_sides: torch.Tensor,
    preconditioner: Operator,
    tolerance: float,
    max_products: int,
    snapshot_steps: Sequence[int] = (),
) -> SolveResult:
    """Solve ``A x = b`` for every column of ``b`` by CG preconditioned with M, from ``x = 0``.

    ``operator`` is ``v -> A v`` on (C, P) vectors; ``preconditioner`` ``v -> M v``. A column stops
    when ``||r|| <= tolerance ||b||``, after ``max_products`` products of A, or as diverged when a
    step finds non-positive curvature or a non-finite value (its last finite iterate is kept).

    Memory: x, r and p per column, and during a step A p, then M r (``z`` is folded into p at once);
    while every column is active they are updated in place.
    """
    dtype = solver_dtype(right_hand_sides)
    b = right_hand_sides.to(dtype)
    count = b.shape[0]
    b_norm = _norms(b).clamp_min(torch.finfo(dtype).tiny)
    x = torch.zeros_like(b)
    r = b.clone()
    # A copy: p is updated in place, and a preconditioner may hand back its argument.
    p = preconditioner(r).to(dtype, copy=True)
    rz = _dots(r, p)
    products = [0] * count
    status = [STEP_LIMIT] * count
    residuals = (_norms(r) / b_norm).tolist()
    active = torch.ones(count, dtype=torch.bool)
    history: list[list[float]] = []
    snapshots: dict[int, torch.Tensor] = {}
    for step in range(max_products):
        if step in snapshot_steps:
            snapshots[step] = x.clone()
        for column in range(count):
            if active[column] and residuals[column] <= tolerance:
                active[column] = False
                status[column] = CONVERGED
        if not bool(active.any()):
            break
        columns = active.nonzero().squeeze(1)
        whole = len(columns) == count
        direction = p if whole else p[columns]
        curvature = operator(direction).to(dtype)
        p_curvature = _dots(direction, curvature)
        alpha = rz[columns] / p_curvature
        bad = ~torch.isfinite(alpha) | (p_curvature <= 0) | ~torch.isfinite(curvature).all(1)
        for position, column in enumerate(columns.tolist()):
            products[column] += 1
            if bad[position]:
                active[column] = False
                status[column] = DIVERGED
        if whole and not bool(bad.any()):
            x.addcmul_(p, alpha[:, None])
            r.addcmul_(curvature, alpha[:, None], value=-1.0)
            del curvature, direction
            z = preconditioner(r).to(dtype)
            rz_next = _dots(r, z)
            p.mul_((rz_next / rz)[:, None]).add_(z)
            del z
            rz = rz_next
        else:
            good = ~bad
            columns, alpha, curvature, direction = columns[good], alpha[good], curvature[good], direction[good]
            x[columns] += alpha[:, None] * direction
            r[columns] -= alpha[:, None] * curvature
            z_next = preconditioner(r[columns]).to(dtype)
            rz_next = _dots(r[columns], z_next)
            p[columns] = z_next + (rz_next / rz[columns])[:, None] * direction
            rz[columns] = rz_next
        step = [float("nan")] * count
        for column, value in zip(columns.tolist(), (_norms(r[columns]) / b_norm[columns]).tolist()):
            residuals[column] = step[column] = value
        history.append(step)
    for column in range(count):
        if status[column] == STEP_LIMIT and residuals[column] <= tolerance:
            status[column] = CONVERGED
    _fill_snapshots(snapshots, snapshot_steps, x)
    return SolveResult(x, residuals, products, status, history, snapshots)


def _fill_snapshots(snapshots: dict[int, torch.Tensor], steps: Sequence[int], final: torch.Tensor) -> None:
    """Steps the solve never reached (every column stopped before) hold the final iterate."""
    for step in steps:
        snapshots.setdefault(step, final.clone())


def preconditioned_momentum(
    minibatch_operator: Callable[[int], Operator],
    right_hand_sides: torch.Tensor,
    preconditioner: Operator,
    steps: int,
    learning_rate: float,
    momentum: float,
    decay: float = 1.0,
    check: Operator | None = None,
    tolerance: float = 0.0,
    check_every: int = 0,
    snapshot_steps: Sequence[int] = (),
) -> SolveResult:
    """The ASTRA iteration for every column of ``b``: ``steps`` mini-batch products per column.

    ``minibatch_operator(t)`` is ``v -> A_t v`` on step t's mini-batch. The step length is
    ``learning_rate * decay^t``. ``check`` (``v -> A v`` on the whole sample) measures the
    residual every ``check_every`` steps and at the end, stopping converged columns (each check
    counts as one product); without it, the residual is that of the last mini-batch. A column
    whose residual grows past 1e6 times ``||b||`` or turns non-finite is stopped as diverged and
    falls back to its last finite iterate.
    """
    dtype = solver_dtype(right_hand_sides)
    b = right_hand_sides.to(dtype)
    count = b.shape[0]
    b_norm = _norms(b).clamp_min(torch.finfo(dtype).tiny)
    x = torch.zeros_like(b)
    velocity = torch.zeros_like(b)
    products = [0] * count
    status = [STEP_LIMIT] * count
    residuals = [1.0] * count
    active = torch.ones(count, dtype=torch.bool)
    history: list[list[float]] = []
    rate = learning_rate
    snapshots: dict[int, torch.Tensor] = {}
    for step in range(steps):
        if step in snapshot_steps:
            snapshots[step] = x.clone()
        columns = active.nonzero().squeeze(1)
        if len(columns) == 0:
            break
        residual = b[columns] - minibatch_operator(step)(x[columns]).to(dtype)
        relative = _norms(residual) / b_norm[columns]
        record = [float("nan")] * count
        for position, column in enumerate(columns.tolist()):
            products[column] += 1
            value = float(relative[position])
            residuals[column] = record[column] = value
            if not torch.isfinite(relative[position]) or value > 1e6:
                active[column] = False
                status[column] = DIVERGED
        history.append(record)
        healthy = torch.isfinite(relative) & (relative <= 1e6)
        columns, residual = columns[healthy], residual[healthy]
        velocity[columns] = momentum * velocity[columns] + preconditioner(residual).to(dtype)
        x[columns] += rate * velocity[columns]
        rate *= decay
        if check is not None and check_every and (step + 1) % check_every == 0:
            _check(check, b, x, b_norm, active, products, residuals, status, tolerance)
    if check is not None:
        _check(check, b, x, b_norm, active | torch.tensor([s == STEP_LIMIT for s in status]), products, residuals, status, tolerance)
    _fill_snapshots(snapshots, snapshot_steps, x)
    return SolveResult(x, residuals, products, status, history, snapshots)


def _check(operator: Operator, b: torch.Tensor, x: torch.Tensor, b_norm: torch.Tensor, active: torch.Tensor,
           products: list[int], residuals: list[float], status: list[str], tolerance: float) -> None:
    """Residuals of the active columns on the whole sample; those within ``tolerance`` stop."""
    columns = active.nonzero().squeeze(1)
    if len(columns) == 0:
        return
    relative = _norms(b[columns] - operator(x[columns]).to(b.dtype)) / b_norm[columns]
    for position, column in enumerate(columns.tolist()):
        products[column] += 1
        residuals[column] = float(relative[position])
        if residuals[column] <= tolerance:
            active[column] = False
            status[column] = CONVERGED
