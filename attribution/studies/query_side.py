"""Query-side cost, measured in one run: preconditioned, compressed query factors and their refinement.

- ``closed form``: the queries' EK-FAC factors at rank r, by the engine (float32 for a float32
  model, every module's queries preconditioned in one batched product, one batched randomized
  SVD per module) and by the reference path it replaced (float64 gradients and preconditioning,
  one randomized SVD per query and module in a Python loop), split into gradients,
  preconditioning and compression, with the engine's relative error against the reference.
- ``refinement``: seconds per Gauss-Newton product and query of the refined inverse (CG on a
  sample of ``sample_sequences`` sequences), so a step budget converts into time.

The factors are fitted on random sequences: the cost does not depend on what they hold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from attribution.benchmark import gpt_neox_from_config, random_batches
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.data.batching import TokenBatch
from attribution.models import find_tracked_modules, model_fingerprint
from attribution.refine.inverse import StageInverse
from attribution.scoring.query_factors import ModuleQueryFactors, factorise, per_sequence_gradients
from attribution.settings import RefineSettings


@dataclass(frozen=True)
class QuerySideRow:
    step: str
    path: str
    queries: int
    rank: int | None
    seconds: float
    detail: str = ""

    @property
    def seconds_per_query(self) -> float:
        return self.seconds / max(1, self.queries)


def reference_factors(model: PreTrainedModel, tracked, batch: TokenBatch, factors: FactorSet,
                      rank: int) -> tuple[dict[str, ModuleQueryFactors], dict[str, float]]:
    """The path the engine replaced: float64 throughout, a randomized SVD per query and module."""
    timings = {}
    started = time.perf_counter()
    gradients = per_sequence_gradients(model, tracked, batch, torch.float64)
    timings["gradients"] = time.perf_counter() - started
    preconditioner = Preconditioner(factors, None, next(model.parameters()).device, torch.float64)
    started = time.perf_counter()
    preconditioned = {name: preconditioner.apply(name, g) for name, g in gradients.items()}
    timings["preconditioning"] = time.perf_counter() - started
    started = time.perf_counter()
    modules = {}
    for name, matrices in preconditioned.items():
        lefts, rights = [], []
        for matrix in matrices:
            u, s, v = torch.svd_lowrank(matrix, q=min(rank + 10, min(matrix.shape)), niter=4)
            lefts.append(u[:, :rank] * s[:rank])
            rights.append(v[:, :rank])
        modules[name] = ModuleQueryFactors(torch.stack(lefts), torch.stack(rights))
    timings["compression"] = time.perf_counter() - started
    return modules, timings


def engine_factors(model: PreTrainedModel, tracked, batch: TokenBatch, factors: FactorSet,
                   rank: int) -> tuple[dict[str, ModuleQueryFactors], dict[str, float]]:
    """What :meth:`Stages.query_factors` does for a single closed-form stage, timed step by step."""
    inverse = StageInverse("model", model, tracked, Preconditioner(factors, None, next(model.parameters()).device,
                                                                   torch.float32), RefineSettings())
    timings = {}
    started = time.perf_counter()
    gradients = per_sequence_gradients(model, tracked, batch, inverse.dtype)
    flat = inverse.layout.join(gradients)
    timings["gradients"] = time.perf_counter() - started
    started = time.perf_counter()
    solutions, _ = inverse(flat, batch.ids)
    timings["preconditioning"] = time.perf_counter() - started
    started = time.perf_counter()
    query_set, _ = factorise(batch.ids, inverse.layout.split(solutions), rank)
    timings["compression"] = time.perf_counter() - started
    return query_set.modules, timings


def relative_error(actual: dict[str, ModuleQueryFactors], expected: dict[str, ModuleQueryFactors]) -> float:
    """``||P - P_ref|| / ||P_ref||`` over every module and query, P the rank-r reconstruction."""
    squared_error = squared_norm = 0.0
    for name, reference in expected.items():
        dense = reference.dense().to(torch.float64)
        squared_error += float((actual[name].dense().to(torch.float64) - dense).square().sum())
        squared_norm += float(dense.square().sum())
    return (squared_error / squared_norm) ** 0.5


def run_query_side(config: dict[str, int], queries: int, rank: int, query_length: int, sample_sequences: int,
                   refine_queries: int, refine_steps: int, device: torch.device, seed: int = 0) -> list[QuerySideRow]:
    torch.manual_seed(seed)
    model = gpt_neox_from_config(**config).to(device)
    tracked = find_tracked_modules(model)
    vocab = model.config.vocab_size
    fit_batches = [b.to(device) for b in random_batches(vocab, max(1, sample_sequences // 8), 8, 128, seed=seed)]
    fit_config = FitConfig(strategy="ekfac", fisher="true", seed=seed, dtype=torch.float32, progress=False)
    factors = fit_factors(model, tracked, lambda: fit_batches, fit_config, model_fingerprint(model), {})
    batch = random_batches(vocab, 1, queries, query_length, seed=seed + 1)[0].to(device)
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    reference, reference_timings = reference_factors(model, tracked, batch, factors, rank)
    engine, engine_timings = engine_factors(model, tracked, batch, factors, rank)
    error = relative_error(engine, reference)
    for path, timings in (("reference (float64, per-matrix SVD)", reference_timings), ("engine", engine_timings)):
        for step, seconds in timings.items():
            rows.append(QuerySideRow(f"closed form: {step}", path, queries, rank, seconds))
        detail = f"{parameters / 1e6:.1f}M parameters" if path != "engine" else f"relative error vs the reference {error:.1e}"
        rows.append(QuerySideRow("closed form: total", path, queries, rank, sum(timings.values()), detail))
    rows.append(_refinement_row(model, tracked, factors, fit_batches, device, refine_queries, refine_steps, query_length, seed))
    return rows


def _refinement_row(model, tracked, factors: FactorSet, sample: Sequence[TokenBatch], device: torch.device, queries: int,
                    steps: int, query_length: int, seed: int) -> QuerySideRow:
    """Seconds per Gauss-Newton product and query of CG on the sample (tolerance 0: every step runs)."""
    batch = random_batches(model.config.vocab_size, 1, queries, query_length, seed=seed + 2)[0].to(device)
    settings = RefineSettings(method="cg", steps=steps, tolerance=1e-12, max_sequences=None)
    inverse = StageInverse("model", model, tracked, Preconditioner(factors, None, device, torch.float32), settings, list(sample))
    gradients = inverse.layout.join(per_sequence_gradients(model, tracked, batch, inverse.dtype))
    started = time.perf_counter()
    _, diagnostics = inverse(gradients, batch.ids)
    seconds = time.perf_counter() - started
    products = max(d["gauss_newton_products"] for d in diagnostics)
    sequences = sum(len(b.ids) for b in sample)
    return QuerySideRow("refinement: one CG product", "engine", queries, None, seconds / products,
                        f"{seconds / products / queries:.2f} s per product and query, G of {sequences} sequences of 128 tokens, "
                        f"{products} products")


def format_rows(rows: Sequence[QuerySideRow]) -> str:
    header = f"{'step':<30}{'path':<38}{'queries':>8}{'rank':>6}{'seconds':>10}{'s/query':>10}  detail"
    lines = [header, "-" * len(header)]
    for row in rows:
        rank = "-" if row.rank is None else str(row.rank)
        lines.append(f"{row.step:<30}{row.path:<38}{row.queries:>8}{rank:>6}{row.seconds:>10.2f}{row.seconds_per_query:>10.3f}  {row.detail}")
    return "\n".join(lines)
