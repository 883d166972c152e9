"""The exact inverse-Gauss-Newton products every method is compared with.

Single stage: ``x = (G + lambda I)^{-1} grad m(q)``. Multi-stage, two chained exact solves,
fine-tuned stage first: ``y = (G_ft + lambda_ft I)^{-1} grad m(q; theta_ft)``, then
``x = (G_pt + lambda_pt I)^{-1} y``. A damping is therefore one value per stage.

``cg``: conjugate gradient on Gauss-Newton-vector products over all tracked parameters: plain
multi-shift CG, every damping of a stage whose right-hand side is shared from one Krylov run
(``ground_truth.preconditioner=none``, the default), or CG preconditioned by the EK-FAC fit, one
run per damping (``preconditioner=ekfac``). Either way the solution is that of the exact system,
to the stated residual; ``dense``: the explicit G and a Cholesky solve, for small models.
Solutions are cached in a safetensors file named by a hash of everything they depend on, so a
rerun of the evaluation does not repeat a long solve.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.evaluation.config import GroundTruthSpec
from attribution.evaluation.conjugate_gradient import multi_shift_cg
from attribution.evaluation.problem import Problem, Stage
from attribution.refine.solvers import preconditioned_cg

Damping = tuple[float, ...]  # one value per stage, in the problem's stage order


@dataclass
class GroundTruth:
    """Solutions (K, Q, P) per damping, and how they were obtained."""

    dampings: list[Damping]
    solutions: torch.Tensor
    seconds: float
    # CG only: the iterate at a 10x looser tolerance, to show how much the scores still moved.
    snapshot: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def solution(self, damping: Damping) -> torch.Tensor:
        return self.solutions[self.dampings.index(tuple(damping))]


@dataclass
class _StageSolution:
    solutions: list[torch.Tensor]  # per damping, (Q, P)
    snapshots: list[torch.Tensor] | None
    iterations: list[list[int]]  # per damping, per column
    residuals: list[list[float]]  # per damping, per column


def cache_key(problem: Problem, spec: GroundTruthSpec, dampings: Sequence[Damping], batch_size: int) -> str:
    payload = {
        "stages": [{"model": s.fingerprint, "modules": [m.name for m in s.tracked], "fit": [item.id for item in s.fit_items]}
                   for s in problem.stages],
        "queries": problem.query_ids,
        "query_tokens": problem.query_batch.input_ids.tolist(),
        "dampings": [[float(value).hex() for value in damping] for damping in dampings],
        "spec": asdict(spec),
        "batch_size": batch_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def solve(problem: Problem, spec: GroundTruthSpec, dampings: Sequence[Damping], batch_size: int, progress: bool = False,
          preconditioner_factors: Sequence[FactorSet] | None = None) -> GroundTruth:
    """Solve for every query and damping (no cache). ``preconditioner_factors``: per stage, the factors of
    ``spec.preconditioner`` over every tracked module (CG with a preconditioner only)."""
    started = time.perf_counter()
    dampings = [tuple(float(value) for value in damping) for damping in dampings]
    right_hand_sides = [problem.query_vectors(problem.query_stage.tracked)] * len(dampings)
    info: dict[str, Any] = {"kind": spec.kind, "preconditioner": spec.preconditioner, "tolerance": spec.tolerance,
                            "stages": []}
    snapshots: list[torch.Tensor] | None = None
    for index, stage in enumerate(problem.stages):
        factors = None if preconditioner_factors is None else preconditioner_factors[index]
        result = _solve_stage(stage, spec, right_hand_sides, [d[index] for d in dampings], batch_size, progress, factors)
        right_hand_sides = result.solutions
        # A looser first stage makes the whole chain looser: the last stage's snapshot, from the
        # first stage's converged solution, shows how much the last solve still moved.
        snapshots = result.snapshots
        info["stages"].append({"stage": stage.name, "iterations": result.iterations, "relative_residuals": result.residuals})
    solutions = torch.stack([s.cpu() for s in right_hand_sides])
    info["snapshot_tolerance"] = None if snapshots is None else 10 * spec.tolerance
    snapshot = None if snapshots is None else torch.stack([s.cpu() for s in snapshots])
    return GroundTruth(dampings, solutions, time.perf_counter() - started, snapshot, info)


def _solve_stage(stage: Stage, spec: GroundTruthSpec, right_hand_sides: list[torch.Tensor], dampings: list[float],
                 batch_size: int, progress: bool, factors: FactorSet | None) -> _StageSolution:
    """``(G_s + lambda_k I)^{-1} b_k`` for every damping k of one stage."""
    layout = ParameterLayout(stage.tracked)
    operator = GaussNewton(stage.model, stage.tracked, stage.fit_batches(batch_size))
    if spec.kind == "dense":
        if layout.size > spec.max_dense_parameters:
            raise ValueError(f"ground_truth.kind=dense needs an explicit {layout.size} x {layout.size} matrix; "
                             f"over ground_truth.max_dense_parameters={spec.max_dense_parameters}: use cg")
        matrix = dense_gauss_newton(operator)
        eye = torch.eye(layout.size, dtype=torch.float64, device=matrix.device)
        solutions = [torch.cholesky_solve(b.T.to(matrix.device, torch.float64), torch.linalg.cholesky(matrix + d * eye)).T
                     for b, d in zip(right_hand_sides, dampings)]
        zero = [[0] * len(b) for b in right_hand_sides]
        return _StageSolution(solutions, None, zero, [[0.0] * len(b) for b in right_hand_sides])
    if spec.preconditioner == "none":
        shared = all(b is right_hand_sides[0] for b in right_hand_sides)
        groups = [list(range(len(dampings)))] if shared else [[k] for k in range(len(dampings))]
        solutions: list[torch.Tensor] = [torch.empty(0)] * len(dampings)
        snapshots: list[torch.Tensor] = [torch.empty(0)] * len(dampings)
        iterations: list[list[int]] = [[]] * len(dampings)
        residuals: list[list[float]] = [[]] * len(dampings)
        for group in groups:
            values = sorted({dampings[k] for k in group})
            result = multi_shift_cg(operator, right_hand_sides[group[0]], values, spec.tolerance, spec.max_iterations,
                                    progress=progress)
            for k in group:
                position = values.index(dampings[k])
                solutions[k], snapshots[k] = result.solutions[position], result.snapshot[position]
                iterations[k], residuals[k] = result.iterations, result.relative_residuals[position].tolist()
        return _StageSolution(solutions, snapshots, iterations, residuals)
    if factors is None:
        raise ValueError(f"ground_truth.preconditioner={spec.preconditioner} needs its fitted factors")
    solutions, iterations, residuals = [], [], []
    for b, damping in zip(right_hand_sides, dampings):
        preconditioner = Preconditioner(factors, damping, operator.device)

        def damped(vectors: torch.Tensor, damping: float = damping) -> torch.Tensor:
            return operator(vectors) + damping * vectors.to(torch.float64)

        result = preconditioned_cg(damped, b, lambda v: preconditioner.apply_flat(v, layout), spec.tolerance, spec.max_iterations)
        solutions.append(result.solution)
        iterations.append(result.products)
        residuals.append(result.relative_residuals)
    return _StageSolution(solutions, None, iterations, residuals)


def cached_solve(
    problem: Problem, spec: GroundTruthSpec, dampings: Sequence[Damping], batch_size: int, directory: Path, progress: bool = False,
    preconditioner_factors: Sequence[FactorSet] | None = None,
) -> GroundTruth:
    """:func:`solve`, or the cached result of an identical earlier solve."""
    path = directory / f"{cache_key(problem, spec, dampings, batch_size)}.safetensors"
    if path.is_file():
        return _load(path)
    truth = solve(problem, spec, dampings, batch_size, progress, preconditioner_factors)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"solutions": truth.solutions.contiguous()}
    if truth.snapshot is not None:
        tensors["snapshot"] = truth.snapshot.contiguous()
    metadata = {"dampings": json.dumps(truth.dampings), "seconds": repr(truth.seconds), "info": json.dumps(truth.info)}
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(staging), metadata=metadata)
    staging.replace(path)
    return truth


def _load(path: Path) -> GroundTruth:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    info = {**json.loads(metadata["info"]), "cached": str(path)}
    dampings = [tuple(d) for d in json.loads(metadata["dampings"])]
    return GroundTruth(dampings, tensors["solutions"], float(metadata["seconds"]), tensors.get("snapshot"), info)
