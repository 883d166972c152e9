"""Query-side cost, measured in one run: preconditioned, compressed query factors and their refinement.

- ``closed form``: the queries' EK-FAC factors at rank r, by the engine (float32 for a float32
  model; each module's gradients rotated into the Kronecker eigenbasis from their per-token
  factors, divided, compressed there by one batched randomized SVD, and only the rank-r factors
  rotated back) and by the reference path it replaced (float64 gradients and preconditioning in
  the parameter basis, one randomized SVD per query and module in a Python loop), split into
  gradients, preconditioning and compression, with each path's rank-r error against the exact
  preconditioned gradients and the best rank-r error.
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
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet
from attribution.data.batching import TokenBatch
from attribution.models import find_tracked_modules, model_fingerprint
from attribution.refine.inverse import StageInverse
from attribution.scoring.query_factors import ModuleQueryFactors, factorise, per_sequence_gradients, per_token_gradients
from attribution.scoring.stages import Stages
from attribution.settings import Check, RefineSettings


@dataclass(frozen=True)
class QuerySideSettings:
    """Mirrors ``query_benchmark`` in conf/query_benchmark.yaml."""

    config: dict[str, int]
    queries: int = 64
    rank: int = 32
    query_length: int = 64
    sample_sequences: int = 16
    refine_queries: int = 8
    refine_steps: int = 3
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("query_benchmark", self)
        for key in ("queries", "rank", "query_length", "sample_sequences", "refine_queries", "refine_steps"):
            check.integer(key, 1)
        check.integer("seed", 0)
        check.device("device")
        check.done()


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
                      rank: int) -> tuple[dict[str, ModuleQueryFactors], dict[str, float], dict[str, torch.Tensor]]:
    """The path the engine replaced: float64 throughout, a randomized SVD per query and module. Also
    returns the uncompressed preconditioned gradients."""
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
    return modules, timings, preconditioned


def engine_factors(model: PreTrainedModel, tracked, batch: TokenBatch, factors: FactorSet,
                   rank: int) -> tuple[dict[str, ModuleQueryFactors], dict[str, float]]:
    """:meth:`Stages.query_factors` of one closed-form stage (the ``total``), and the same steps timed one
    by one: per-token gradients, rotation into the eigenbasis and division, compression there and
    rotation of the rank-r factors back."""
    device = next(model.parameters()).device
    preconditioner = Preconditioner(factors, None, device, torch.float32)
    stages = Stages(model, None, model, None, list(tracked), list(tracked),
                    [StageInverse("model", model, tracked, preconditioner, RefineSettings())], factors.manifest.strategy, {}, {})
    started = time.perf_counter()
    result = stages.query_factors(batch, rank)
    total = time.perf_counter() - started
    timings = {}
    started = time.perf_counter()
    tokens = per_token_gradients(model, tracked, batch, torch.float32)
    timings["gradients"] = time.perf_counter() - started
    started = time.perf_counter()
    rotated = {name: preconditioner.divide(name, preconditioner.tokens_to_eigenbasis(name, ds, a)) for name, (ds, a) in tokens.items()}
    timings["preconditioning"] = time.perf_counter() - started
    started = time.perf_counter()
    factorise(batch.ids, rotated, rank, lambda name, f: ModuleQueryFactors(*preconditioner.factors_from_eigenbasis(name, f.left, f.right)))
    timings["compression"] = time.perf_counter() - started
    timings["total (one call)"] = total
    return result.factors.modules, timings


def relative_error(factors: dict[str, ModuleQueryFactors], exact: dict[str, torch.Tensor]) -> float:
    """``||P - L R^T|| / ||P||`` over every module and query, P the float64 preconditioned gradients."""
    squared_error = squared_norm = 0.0
    for name, dense in exact.items():
        squared_error += float((factors[name].dense().to(torch.float64) - dense).square().sum())
        squared_norm += float(dense.square().sum())
    return (squared_error / squared_norm) ** 0.5


def optimal_error(exact: dict[str, torch.Tensor], rank: int) -> float:
    """The same for the best rank-r approximation (exact SVD): the floor of any rank-r compression."""
    squared_error = squared_norm = 0.0
    for dense in exact.values():
        values = torch.linalg.svdvals(dense)
        squared_error += float(values[:, rank:].square().sum())
        squared_norm += float(values.square().sum())
    return (squared_error / squared_norm) ** 0.5


def run_query_side(settings: QuerySideSettings, device: torch.device) -> list[QuerySideRow]:
    queries, rank, query_length, seed = settings.queries, settings.rank, settings.query_length, settings.seed
    sample_sequences = settings.sample_sequences
    torch.manual_seed(seed)
    model = gpt_neox_from_config(**settings.config).to(device)
    tracked = find_tracked_modules(model)
    vocab = model.config.vocab_size
    fit_batches = [b.to(device) for b in random_batches(vocab, max(1, sample_sequences // 8), 8, 128, seed=seed)]
    fit_config = FitConfig(strategy="ekfac", fisher="true", seed=seed, dtype=torch.float32, progress=False)
    factors = fit_factors(model, tracked, lambda: fit_batches, fit_config, model_fingerprint(model), {})
    batch = random_batches(vocab, 1, queries, query_length, seed=seed + 1)[0].to(device)
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    reference, reference_timings, exact = reference_factors(model, tracked, batch, factors, rank)
    engine, engine_timings = engine_factors(model, tracked, batch, factors, rank)
    floor = optimal_error(exact, rank)
    for path, timings, result in (("reference (float64, per-matrix SVD)", reference_timings, reference),
                                  ("engine", engine_timings, engine)):
        total = timings.pop("total (one call)", sum(timings.values()))
        for step, seconds in timings.items():
            rows.append(QuerySideRow(f"closed form: {step}", path, queries, rank, seconds))
        detail = (f"{parameters / 1e6:.1f}M parameters; rank-{rank} error {relative_error(result, exact):.4f} "
                  f"(best rank-{rank}: {floor:.4f})")
        rows.append(QuerySideRow("closed form: total", path, queries, rank, total, detail))
    rows.append(_refinement_row(model, tracked, factors, fit_batches, device, settings.refine_queries, settings.refine_steps,
                                query_length, seed))
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
