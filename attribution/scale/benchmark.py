"""The scale benchmark: every stage of a fit and a score run on a rehearsal model, timed, its peak memory
measured and predicted by :mod:`attribution.scale.memory_model`, and the candidate pass against the
plain forward+backward of the same batches (the floor)."""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attribution.benchmark import plain_forward_backward
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet, load_factors, save_factors
from attribution.data.batching import batch_queries
from attribution.data.queries import read_queries
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine.inverse import StageInverse
from attribution.refine.sample import sample_batches
from attribution.scale.memory_model import (
    ModelShape,
    ModuleShape,
    RunShape,
    eigendecomposition_cubes,
    measured_eigh_constant,
    measured_throughput,
    model_shape,
    stage_bytes,
    stage_multiply_adds,
)
from attribution.scale.peaks import StagePeaks
from attribution.scale.projection import REAL_MODELS, format_projection, project, real_shape
from attribution.scale.rehearsal import REHEARSALS, build_model_directory, rehearsal, write_corpus, write_queries
from attribution.scale.sharded import run_sharding_comparison
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import concatenate
from attribution.scoring.stages import Stages
from attribution.settings import SHARDING_ENGINES, RefineSettings, SettingsError, torch_dtype


@dataclass(frozen=True)
class ScaleSettings:
    """``scale.*`` of conf/scale.yaml, checked when the job starts."""

    models: tuple[str, ...]
    documents: int
    batch_size: int
    sequence: int
    queries: int
    query_batch_size: int
    query_tokens: int
    rank: int
    device: str
    dtype: str = "float32"
    projections: tuple[str, ...] = ()
    corpus_tokens: float = 1e9
    efficiency: float = 0.4
    # Also score each model sharded over ``workers`` Ray workers and unsharded (:mod:`attribution.scale.sharded`).
    sharding: str = "none"
    workers: int = 2
    # The refinement's stage (0 sequences: none): CG on the first ``refine_sequences`` documents in batches of
    # ``refine_batch``, ``refine_steps`` products, the first ``refine_cached`` sequences' graphs kept,
    # ``refine_columns`` queries solved together, each document cut to ``refine_length`` tokens (None: ``sequence``).
    refine_sequences: int = 4
    refine_steps: int = 2
    refine_cached: int = 2
    refine_columns: int = 2
    refine_batch: int = 1
    refine_length: int | None = None
    # score.normalize: each document's gradient norm taken in the candidate pass.
    normalize: bool = False
    # Refine only the first N queries: its time grows with each one, its memory with refine_columns.
    refine_queries: int = 2

    def __post_init__(self) -> None:
        for name in self.models:
            if name not in REHEARSALS:
                raise SettingsError(f"scale.models: unknown rehearsal model {name!r}; known: {', '.join(REHEARSALS)}")
        for name in self.projections:
            if name not in REAL_MODELS:
                raise SettingsError(f"scale.projections: unknown model {name!r}; known: {', '.join(REAL_MODELS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SettingsError(f"scale.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 < self.efficiency <= 1:
            raise SettingsError(f"scale.efficiency must be in (0, 1], got {self.efficiency}")
        for key in ("documents", "batch_size", "sequence", "queries", "query_batch_size", "query_tokens", "rank",
                    "refine_steps", "refine_columns", "refine_queries", "refine_batch"):
            if getattr(self, key) < 1:
                raise SettingsError(f"scale.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("refine_sequences", "refine_cached"):
            if getattr(self, key) < 0:
                raise SettingsError(f"scale.{key} must be at least 0, got {getattr(self, key)}")
        if self.sharding not in SHARDING_ENGINES:
            raise SettingsError(f"scale.sharding must be one of {', '.join(SHARDING_ENGINES)}, got {self.sharding!r}")
        if self.workers < 1:
            raise SettingsError(f"scale.workers must be at least 1, got {self.workers}")
        if self.query_tokens < 2:
            raise SettingsError("scale.query_tokens must be at least 2 (a prompt and a completion token)")
        if self.refine_length is not None and (isinstance(self.refine_length, bool) or not isinstance(self.refine_length, int)
                                               or self.refine_length < 2):
            raise SettingsError(f"scale.refine_length must be an integer of at least 2 or null, got {self.refine_length!r}")
        if not isinstance(self.normalize, bool):
            raise SettingsError(f"scale.normalize must be true or false, got {self.normalize!r}")

    @property
    def rehearsal_settings(self) -> dict:
        """What a rehearsal's result depends on (a kept result is reused when these match)."""
        return {key: value for key, value in asdict(self).items() if key not in ("sharding", "workers")}

    @property
    def run(self) -> RunShape:
        return RunShape(batch=self.batch_size, sequence=self.sequence, queries=self.queries, query_batch=self.query_batch_size,
                        query_tokens=self.query_tokens, rank=self.rank,
                        refine_sequences=min(self.refine_sequences, self.documents),
                        refine_length=self.refine_length or self.sequence,
                        refine_batch=self.refine_batch, refine_cached=self.refine_cached,
                        refine_columns=min(self.refine_columns, self.refine_queries, self.queries), normalize=self.normalize)


@dataclass
class StageRow:
    model: str
    stage: str
    seconds: float
    predicted_seconds: float | None
    peak_gib: float
    predicted_gib: float | None

    @property
    def ratio(self) -> float | None:
        """Measured over predicted peak, above the process's baseline."""
        return None if self.predicted_gib is None else self.peak_gib / self.predicted_gib


@dataclass
class Rehearsed:
    model: str
    rows: list[StageRow]
    shape: ModelShape
    candidate_over_floor: float  # throughput of the candidate pass over that of the plain forward+backward
    baseline_gib: float
    dtype: str = "float32"
    # The refinement stage's Gauss-Newton products, summed over its queries (0: not run).
    refined_products: int = 0


def rehearse(name: str, root: Path, run: RunShape, documents: int, device: str = "cpu", dtype: str = "float32",
             refine_steps: int = 2, refine_queries: int = 2) -> Rehearsed:
    """Fit and score rehearsal ``name`` in this process, one stage after the other, the model in ``dtype``;
    then, with ``run.refine_sequences``, refine the first ``refine_queries`` query gradients by ``refine_steps``
    CG products."""
    directory = build_model_directory(name, root / name)
    corpus = write_corpus(root / f"corpus-{documents}x{run.sequence}.jsonl", documents, run.sequence)
    query_file = write_queries(root / f"queries-{run.queries}x{run.query_tokens}.jsonl", run.queries, run.query_tokens // 2,
                               run.query_tokens - run.query_tokens // 2)
    store = root / f"factors-{name}"
    throughput, eigh_constant = measured_throughput(device=device), measured_eigh_constant()
    with StagePeaks(torch.device(device)) as peaks:
        peaks.stage("load model")
        model, tokenizer = load_model(directory, dtype=torch_dtype(dtype), device=device)
        tracked = find_tracked_modules(model)
        peaks.stage("probe and fingerprint")
        shape = model_shape(model)
        batches = sample_batches(tokenizer, str(corpus), run.sequence + 1, run.batch, documents, lambda skip: None, "scale")
        fingerprint = model_fingerprint(model)
        factors = fit_factors(model, tracked, lambda: batches, FitConfig(progress=False), fingerprint, {})
        peaks.stage("save store")
        shutil.rmtree(store, ignore_errors=True)
        save_factors(factors, store)
        del factors
        gc.collect()
        peaks.stage("load store")
        def eigen_form() -> FactorSet:
            return load_factors(store, tracked, fingerprint, covariances=False)

        preconditioner = Preconditioner(eigen_form(), None, device, torch.float32, eigen_form)
        stages = Stages(model, tokenizer, model, tokenizer, tracked, tracked,
                        [StageInverse("model", model, tracked, preconditioner, RefineSettings())], "ekfac", {}, {})
        peaks.stage("query gradients")
        queries = read_queries(query_file, lambda skip: None)
        query_batches = list(batch_queries(tokenizer, queries, run.query_batch, run.query_tokens + 1, lambda skip: None))
        query_factors = concatenate([stages.query_factors(batch, run.rank).factors for batch in query_batches])
        peaks.stage("candidate pass")
        stages.release_curvature()
        scorer = CandidateScorer(model, tracked, query_factors, run.sequence, torch.float32,
                                 dense_budget_mib=run.dense_factors_mib, normalize=run.normalize)
        del query_factors  # the scorer keeps its own layout of them, as a score run's worker does
        started = time.perf_counter()
        for batch in batches:
            scorer.layer_scores(batch)
        candidate_seconds = time.perf_counter() - started
        peaks.stage("token scores")
        scorer.token_scores(batches[0])
        del scorer
        refined_products = 0
        if run.refine_sequences:
            peaks.stage("refinement")
            refine = RefineSettings(method="cg", steps=refine_steps, batch_size=run.refine_batch,
                                    max_sequences=run.refine_sequences, cached_sequences=run.refine_cached,
                                    columns=run.refine_columns)
            sample = sample_batches(tokenizer, str(corpus), run.refine_length + 1, run.refine_batch, run.refine_sequences,
                                    lambda skip: None, "scale")
            refined = Stages(model, tokenizer, model, tokenizer, tracked, tracked,
                             [StageInverse("model", model, tracked, preconditioner, refine, sample)], "ekfac", {}, {})
            first = batch_queries(tokenizer, queries[:refine_queries], run.query_batch, run.query_tokens + 1, lambda skip: None)
            diagnostics = [entry for batch in first for entry in refined.query_factors(batch, run.rank).diagnostics]
            refined_products = sum(entry["gauss_newton_products"] for entry in diagnostics)
            del refined, sample
            gc.collect()
        peaks.stage("plain forward+backward")
        step = plain_forward_backward(model)
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        floor_seconds = time.perf_counter() - started
    predicted = stage_bytes(shape, run)
    multiply_adds = stage_multiply_adds(shape, run)
    passes = len(batches)
    # The passes' multiply-adds are per micro-batch; the query stage's are for all the queries.
    predicted_seconds = {stage: (1 if stage == "query gradients" else passes) * value / throughput
                         for stage, value in multiply_adds.items()}
    predicted_seconds["eigendecomposition"] = eigh_constant * eigendecomposition_cubes(shape)
    rows = [StageRow(name, peak.name, peak.seconds, predicted_seconds.get(peak.name), (peak.peak_bytes - peaks.baseline) / 2**30,
                     None if peak.name not in predicted else predicted[peak.name] / 2**30)
            for peak in peaks.stages]
    return Rehearsed(name, rows, shape, floor_seconds / candidate_seconds, peaks.baseline / 2**30, dtype, refined_products)


def format_rehearsal(result: Rehearsed) -> str:
    """One table per rehearsal: seconds measured and predicted, peak GiB above the baseline measured and
    predicted, and their ratio."""
    spec = rehearsal(result.model)
    lines = [f"{result.model} ({result.dtype}): {spec.stands_for}; "
             f"baseline {result.baseline_gib:.2f} GiB resident before loading",
             f"  {'stage':<24} {'seconds':>9} {'predicted':>9} {'peak GiB':>9} {'predicted':>9} {'ratio':>6}"]
    for row in result.rows:
        predicted_seconds = "-" if row.predicted_seconds is None else f"{row.predicted_seconds:.1f}"
        predicted_gib = "-" if row.predicted_gib is None else f"{row.predicted_gib:.2f}"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(f"  {row.stage:<24} {row.seconds:>9.1f} {predicted_seconds:>9} "
                     f"{row.peak_gib:>9.2f} {predicted_gib:>9} {ratio:>6}")
    lines.append(f"  candidate pass throughput / plain forward+backward: {result.candidate_over_floor:.2f}")
    if result.refined_products:
        lines.append(f"  refinement: {result.refined_products} Gauss-Newton products over the queries")
    return "\n".join(lines)


def run_scale(settings: ScaleSettings, output_dir: Path, say: Callable[[str], None]) -> list[Rehearsed]:
    """Every rehearsal of ``settings.models``, each kept in ``output_dir/<model>-<dtype>.json`` when it ends: a
    rerun with the same settings skips the models already measured."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in settings.models:
        record = output_dir / f"{name}-{settings.dtype}.json"
        kept = json.loads(json.dumps(settings.rehearsal_settings))
        if record.is_file() and {k: v for k, v in json.loads(record.read_text()).get("settings", {}).items()
                                 if k not in ("sharding", "workers")} == kept:
            result = _rehearsed_from(json.loads(record.read_text()))
        else:
            say(f"rehearsing {name} ({rehearsal(name).stands_for}) ...")
            result = rehearse(name, output_dir / "rehearsal", settings.run, settings.documents, settings.device, settings.dtype,
                              settings.refine_steps, settings.refine_queries)
            record.write_text(json.dumps({"settings": settings.rehearsal_settings, "result": asdict(result)}, indent=2) + "\n")
        say(format_rehearsal(result))
        results.append(result)
        if settings.sharding != "none":
            run_sharding_comparison(name, output_dir, say, engine=settings.sharding, workers=settings.workers,
                                    documents=settings.documents, sequence=settings.sequence, batch_size=settings.batch_size,
                                    queries=settings.queries, query_tokens=settings.query_tokens, rank=settings.rank,
                                    dtype=settings.dtype)
    for name in settings.projections:
        shape = real_shape(name)
        stages = project(shape, settings.run, settings.corpus_tokens, efficiency=settings.efficiency)
        say(format_projection(name, shape, settings.run, stages, settings.corpus_tokens))
    return results


def _rehearsed_from(raw: dict) -> Rehearsed:
    result = raw["result"]
    shape = result["shape"]
    shape["block_modules"] = tuple(ModuleShape(**m) for m in shape["block_modules"])
    return Rehearsed(result["model"], [StageRow(**row) for row in result["rows"]], ModelShape(**shape),
                     result["candidate_over_floor"], result["baseline_gib"], result["dtype"], result.get("refined_products", 0))
