"""The exact inverse-Gauss-Newton products ``(G + lambda I)^{-1} grad m(q)`` every method is compared with.

``cg``: conjugate gradient on Gauss-Newton-vector products over all tracked parameters: plain
multi-shift CG, every damping from one Krylov run (``ground_truth.preconditioner=none``, the
default: on the demo it reached a 10x smaller residual in half the time), or CG preconditioned
by the EK-FAC fit, one run per damping (``preconditioner=ekfac``). Either way the solution is
that of the exact system, to the stated residual; ``dense``: the explicit G and a Cholesky
solve, for small models. Solutions are cached in a safetensors file named by a hash of
everything they depend on, so a rerun of the evaluation does not repeat a long solve.
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

from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.evaluation.config import GroundTruthSpec
from attribution.evaluation.conjugate_gradient import (
    CGResult,
    Operator,
    multi_shift_cg,
    preconditioned_cg,
)
from attribution.evaluation.gauss_newton import GaussNewton, dense_gauss_newton
from attribution.evaluation.parameters import ParameterLayout
from attribution.evaluation.problem import Problem


@dataclass
class GroundTruth:
    """Solutions (Q, P) per damping (ascending), and how they were obtained."""

    dampings: list[float]
    solutions: torch.Tensor  # (K, Q, P)
    seconds: float
    # CG only: the iterate at a 10x looser tolerance, to show how much the scores still moved.
    snapshot: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def solution(self, damping: float) -> torch.Tensor:
        return self.solutions[self.dampings.index(damping)]


def cache_key(problem: Problem, spec: GroundTruthSpec, dampings: Sequence[float], batch_size: int) -> str:
    payload = {
        "model": problem.fingerprint,
        "modules": [m.name for m in problem.tracked],
        "fit_documents": [doc.id for doc in problem.fit_documents],
        "queries": problem.query_ids,
        "query_tokens": problem.query_batch.input_ids.tolist(),
        "dampings": [float(d).hex() for d in sorted(dampings)],
        "spec": asdict(spec),
        "batch_size": batch_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def solve(problem: Problem, spec: GroundTruthSpec, dampings: Sequence[float], batch_size: int, progress: bool = False,
          preconditioner_factors: FactorSet | None = None) -> GroundTruth:
    """Solve for every query and damping (no cache). ``preconditioner_factors``: the factors of
    ``spec.preconditioner`` over every tracked module (CG with a preconditioner only)."""
    started = time.perf_counter()
    dampings = sorted(float(d) for d in dampings)
    layout = ParameterLayout(problem.tracked)
    right_hand_sides = problem.query_vectors(problem.tracked)
    operator = GaussNewton(problem.model, problem.tracked, problem.fit_batches(batch_size))
    if spec.kind == "dense":
        if layout.size > spec.max_dense_parameters:
            raise ValueError(
                f"ground_truth.kind=dense needs an explicit {layout.size} x {layout.size} matrix; "
                f"over ground_truth.max_dense_parameters={spec.max_dense_parameters}: use cg"
            )
        matrix = dense_gauss_newton(operator)
        eye = torch.eye(layout.size, dtype=torch.float64, device=matrix.device)
        solutions = torch.stack([
            torch.cholesky_solve(right_hand_sides.T.to(matrix.device), torch.linalg.cholesky(matrix + d * eye)).T
            for d in dampings
        ])
        return GroundTruth(dampings, solutions.cpu(), time.perf_counter() - started, info={"kind": "dense"})
    if spec.preconditioner == "none":
        result = multi_shift_cg(operator, right_hand_sides, dampings, spec.tolerance, spec.max_iterations, progress=progress)
    else:
        if preconditioner_factors is None:
            raise ValueError(f"ground_truth.preconditioner={spec.preconditioner} needs its fitted factors")
        results = [
            preconditioned_cg(operator, right_hand_sides, d, flat_preconditioner(preconditioner_factors, layout, d),
                              spec.tolerance, spec.max_iterations, progress=progress)
            for d in dampings
        ]
        result = CGResult(
            dampings,
            torch.cat([r.solutions for r in results]),
            [max(column) for column in zip(*(r.iterations for r in results))],
            torch.cat([r.relative_residuals for r in results]),
            [value for r in results for value in r.history],
            torch.cat([r.snapshot for r in results]),
            results[0].snapshot_tolerance,
        )
        iterations_per_damping = {str(d): r.iterations for d, r in zip(dampings, results)}
    info = {
        "kind": "cg",
        "preconditioner": spec.preconditioner,
        "tolerance": spec.tolerance,
        "snapshot_tolerance": result.snapshot_tolerance,
        "iterations": result.iterations,
        "relative_residuals": {str(d): result.relative_residuals[k].tolist() for k, d in enumerate(dampings)},
    }
    if spec.preconditioner != "none":
        info["iterations_per_damping"] = iterations_per_damping
    return GroundTruth(dampings, result.solutions.cpu(), time.perf_counter() - started, result.snapshot.cpu(), info)


def flat_preconditioner(factors: FactorSet, layout: ParameterLayout, damping: float) -> Operator:
    """``M v``, blockwise ``(G_m + lambda I)^{-1} v_m`` of a factor set, on (Q, P) vectors of ``layout``."""
    device = factors.modules[layout.tracked[0].name].activation_eigenvectors.device
    preconditioner = Preconditioner(factors, damping, device)

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        pieces = layout.split(vectors.reshape(-1, layout.size).to(device, torch.float64))
        return layout.join({name: preconditioner.apply(name, matrices) for name, matrices in pieces.items()})

    return apply


def cached_solve(
    problem: Problem, spec: GroundTruthSpec, dampings: Sequence[float], batch_size: int, directory: Path, progress: bool = False,
    preconditioner_factors: FactorSet | None = None,
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
    return GroundTruth(json.loads(metadata["dampings"]), tensors["solutions"], float(metadata["seconds"]), tensors.get("snapshot"), info)
