"""The evaluate workflow: ground truth, every method at every damping, metrics, tables.

Writes ``<output_dir>/metrics/<run_id>.parquet`` and ``<output_dir>/runs/<run_id>.json``;
caches ground-truth solutions under ``<output_dir>/ground_truth/`` and the BM25 index of
the rerank candidates under ``<output_dir>/prefilter/bm25/``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution.curvature.gauss_newton import GaussNewton, use_eager_attention
from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import Document, iter_documents, list_shards
from attribution.data.queries import Query, read_queries
from attribution.evaluation.candidates import (
    Bm25Ranking,
    CandidateSets,
    bm25_ranking,
    candidate_sets,
)
from attribution.evaluation.config import EvaluationSettings
from attribution.evaluation.curvature_structure import CurvatureStructure, curvature_structure
from attribution.evaluation.ground_truth import Damping, GroundTruth, cached_solve
from attribution.evaluation.methods import (
    FactorMethod,
    Prepared,
    prepare_block_exact,
    prepare_lissa,
)
from attribution.evaluation.metrics import (
    fact_tracing,
    mean_per_query,
    pearson,
    ranking,
    spearman,
)
from attribution.evaluation.problem import Problem, Stage
from attribution.evaluation.scores import (
    CandidateScores,
    factors_from_gradients,
    score_candidates,
)
from attribution.evaluation.table import MetricsRow, format_rows, metrics_table
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.runs import RunRecord
from attribution.scoring.stages import shared_modules
from attribution.scoring.tables import write_part
from attribution.settings import (
    DataSettings,
    ModelSettings,
    QuerySettings,
    SettingsError,
    resolve_device,
    torch_dtype,
)


@dataclass
class EvaluationSummary:
    rows: list[MetricsRow]
    comparisons: dict[str, float]
    structure: CurvatureStructure | None  # single-stage only
    metrics_path: Path
    run_record: Path

    def report(self) -> str:
        lines = [format_rows(self.rows)]
        lines += [f"Spearman {pair}: {value:.3f}" for pair, value in self.comparisons.items()]
        if self.structure is not None:
            lines.append(self.structure.describe("EK-FAC"))
        return "\n".join(lines)


@dataclass
class Candidates:
    """The scored documents, in candidate-pass order, and which of them each metric uses."""

    batches: list[TokenBatch]
    doc_ids: list[str]
    sets: CandidateSets

    def rows(self, doc_ids: Sequence[str]) -> list[int]:
        index = {doc_id: row for row, doc_id in enumerate(self.doc_ids)}
        return [index[d] for d in doc_ids if d in index]


class Evaluator:
    """Scores and metrics of each method against the ground truth at one damping."""

    def __init__(self, problem: Problem, candidates: Candidates, queries: Sequence[Query], k: int) -> None:
        self.problem = problem
        self.candidates = candidates
        self.sources = {q.id: list(q.source_ids) for q in queries}
        self.k = k
        self.correlation_rows = candidates.rows(candidates.sets.correlation)

    def score(self, prepared: Prepared, tracked_modules: str) -> CandidateScores:
        return score_candidates(self.problem.model, self.problem.modules(tracked_modules), prepared.factors, self.candidates.batches)

    def row(self, name: str, damping: float, relative: float, scores: CandidateScores, truth: np.ndarray,
            overhead: float, detail: str) -> MetricsRow:
        mine, exact = scores.scores[self.correlation_rows], truth[self.correlation_rows]
        rankings = {}
        scored = set(self.candidates.doc_ids)
        for column, query_id in enumerate(self.problem.query_ids):
            ids = [d for d in self.candidates.sets.rerank[query_id] if d in scored]
            rankings[query_id] = ranking(ids, scores.scores[self.candidates.rows(ids), column])
        mrr, recall = fact_tracing(rankings, self.sources, self.k)
        pairs = scores.scores.shape[0] * scores.scores.shape[1]
        return MetricsRow(name, damping, relative, mean_per_query(mine, exact, spearman), mean_per_query(mine, exact, pearson),
                          overhead, scores.seconds / max(1, pairs), mrr, recall, self.k, detail)


def run_evaluate(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    query_settings: QuerySettings,
    settings: EvaluationSettings,
    output_dir: str | Path,
    config: dict[str, Any],
) -> EvaluationSummary:
    if model_settings.path is None or data_settings.path is None or query_settings.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the job fills them in with the demo)")
    if not settings.methods:
        raise SettingsError("evaluate.methods is empty: nothing to compare with the ground truth")
    output_dir = Path(output_dir)
    record = RunRecord(job="evaluate", config=config)
    shards = list_shards(data_settings.path)
    problem, queries, corpus_ids = _problem(model_settings, data_settings, query_settings, settings, shards, record)
    for stage in problem.stages:
        record.fingerprints[stage.name] = stage.fingerprint
    bm25 = bm25_ranking(queries, data_settings, shards, output_dir / "prefilter" / "bm25", len(corpus_ids), _already_recorded)
    bm25_top = {query.id: bm25.top(query.id, settings.bm25_top) for query in queries}
    sets = candidate_sets(queries, corpus_ids, bm25_top, settings.random_documents, settings.correlation_documents, settings.seed)
    candidates = _candidate_batches(shards, data_settings, sets, problem.candidate_stage.tokenizer, settings.batch_size)
    record.lap("setup")

    fitted: dict[tuple[str, str], FactorMethod] = {}

    def factor_method(kind: str, modules: str) -> FactorMethod:
        if (kind, modules) not in fitted:
            fitted[(kind, modules)] = FactorMethod(kind, modules, problem, settings.batch_size, settings.seed)
        return fitted[(kind, modules)]

    ekfac = factor_method("ekfac", "all")
    mean_eigenvalues = ekfac.mean_eigenvalues()
    units = mean_eigenvalues if settings.damping.relative else [1.0] * len(problem.stages)
    dampings = [tuple(value * unit for unit in units) for value in settings.damping.values]
    truth = cached_solve(problem, settings.ground_truth, dampings, settings.batch_size, output_dir / "ground_truth", settings.progress,
                         ekfac.factor_sets)
    record.lap("ground_truth")
    structure = None
    if not problem.multi_stage:
        # Why per-module methods can or cannot follow the truth on this model (M products of Q columns).
        structure = curvature_structure(GaussNewton(problem.model, problem.tracked, problem.fit_batches(settings.batch_size)),
                                        problem.query_vectors(problem.tracked), ekfac.factor_set, seed=settings.seed)
        record.lap("curvature_structure")

    evaluator = Evaluator(problem, candidates, queries, settings.recall_k)
    layout = ParameterLayout(problem.tracked)
    rows: list[MetricsRow] = []
    comparisons: dict[str, float] = {}
    stability: dict[str, float] = {}
    for value, damping in zip(settings.damping.values, dampings):
        relative = value if settings.damping.relative else damping[-1] / mean_eigenvalues[-1]
        label = _damping_label(problem, damping)
        exact = evaluator.score(Prepared(factors_from_gradients(problem.query_ids, layout.split(truth.solution(damping)), None),
                                         truth.seconds, ""), "all")
        detail = _truth_detail(truth, damping)
        if truth.snapshot is not None:
            # How much the scores still moved since the iterate at the 10x looser tolerance; a query
            # whose CG never met that tolerance has a NaN snapshot and is left out.
            snapshot = truth.snapshot[truth.dampings.index(damping)]
            reached = torch.isfinite(snapshot).all(1).cpu().numpy()
            moved = float("nan")
            if reached.any():
                loose = evaluator.score(Prepared(factors_from_gradients(
                    problem.query_ids, layout.split(torch.nan_to_num(snapshot)), None), 0.0, ""), "all")
                moved = mean_per_query(loose.scores[evaluator.correlation_rows][:, reached],
                                       exact.scores[evaluator.correlation_rows][:, reached])
            stability[label] = moved
            detail += (f"; Spearman with the iterate at {truth.info['snapshot_tolerance']:.0e}: {moved:.3f} "
                       f"({int(reached.sum())} of {len(reached)} queries reached it)")
        rows.append(evaluator.row(settings.ground_truth.kind, damping[-1], relative, exact, exact.scores, truth.seconds, detail))
        rows.append(evaluator.row("bm25", damping[-1], relative, _bm25_scores(bm25, candidates, problem.query_ids, len(corpus_ids)),
                                  exact.scores, bm25.build_seconds, "BM25 of prompt + completion (prefilter index); no curvature"))
        method_scores: dict[str, np.ndarray] = {}
        overheads: dict[str, float] = {}
        # LiSSA at equal time needs its reference's overhead first: run it after every factor method.
        for spec in sorted(settings.methods, key=lambda spec: spec.kind == "lissa"):
            if spec.kind == "lissa":
                budget = None if spec.max_iterations is not None else overheads[spec.equal_time_to]
                prepared = [(spec.name, prepare_lissa(spec, problem, damping[-1], budget, settings.seed))]
            elif spec.kind == "block_exact":
                prepared = [(spec.name, prepare_block_exact(spec, problem, damping[-1], settings.ground_truth, settings.batch_size))]
            elif spec.kind == "refined":
                prepared = factor_method("ekfac", spec.tracked_modules).prepare_refined(spec, damping)
            else:
                prepared = [(spec.name, factor_method(spec.kind, spec.tracked_modules).prepare(spec, damping))]
            for name, method in prepared:
                scores = evaluator.score(method, spec.tracked_modules)
                method_scores[name], overheads[name] = scores.scores, method.overhead_seconds
                detail = method.detail + ("; no damping" if spec.kind == "identity" else "")
                if problem.multi_stage and spec.kind != "identity":
                    detail += f"; dampings {label}"
                rows.append(evaluator.row(name, damping[-1], relative, scores, exact.scores, method.overhead_seconds, detail))
        for name, reference in settings.compare:
            comparisons[f"{name} vs {reference} (damping {label})"] = mean_per_query(
                method_scores[name][evaluator.correlation_rows], method_scores[reference][evaluator.correlation_rows])
        record.lap(f"methods at damping {label}")

    metrics_path = write_part(metrics_table(rows, record.run_id), output_dir / "metrics", record.run_id)
    record.outputs["metrics"] = str(metrics_path)
    record.counts = {
        "fit_sequences": {stage.name: len(stage.fit_items) for stage in problem.stages},
        "queries": len(problem.query_ids),
        "candidate_documents": len(candidates.doc_ids),
        "correlation_documents": len(evaluator.correlation_rows),
        "corpus_documents": len(corpus_ids),
    }
    record.config["resolved"] = {
        "model": asdict(model_settings), "data": asdict(data_settings), "queries": asdict(query_settings),
        "evaluate": asdict(settings), "modules": [m.name for m in problem.tracked],
        "mean_eigenvalues": dict(zip((s.name for s in problem.stages), mean_eigenvalues)), "dampings": dampings,
        "ground_truth": truth.info, "ground_truth_seconds": truth.seconds,
        "ground_truth_stability_spearman": stability, "comparisons": comparisons,
        "curvature_structure": None if structure is None else structure.as_dict(),
        "missing_sources": sets.missing_sources,
        "rerank_sizes": {q: len(ids) for q, ids in sets.rerank.items()},
    }
    record_path = record.write(output_dir)
    return EvaluationSummary(rows, comparisons, structure, metrics_path, record_path)


def _problem(model_settings: ModelSettings, data: DataSettings, query_settings: QuerySettings, settings: EvaluationSettings,
             shards: Sequence[Path], record: RunRecord) -> tuple[Problem, list[Query], list[str]]:
    """The stages (fine-tuned first for ``evaluate.stages=multi``), the queries and every corpus id."""
    device = resolve_device(model_settings.device)
    model, tokenizer = load_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype), device)
    # Every method runs on the same attention implementation as the Gauss-Newton products.
    use_eager_attention(model)
    tracked = find_tracked_modules(model, model_settings.tracked_modules)
    corpus_ids, fit_documents, held_out = _read_corpus(shards, data, settings, tokenizer, record)
    pretrained = Stage("model", model, tokenizer, tracked, fit_documents, data.max_length, model_fingerprint(model), held_out)
    stages = [pretrained]
    query_tokenizer = tokenizer
    if settings.stages == "multi":
        assert settings.finetune_model_path is not None and settings.finetune_data_path is not None
        finetuned, query_tokenizer = load_model(settings.finetune_model_path, model_settings.trust_remote_code,
                                                torch_dtype(model_settings.dtype), device)
        use_eager_attention(finetuned)
        kept, finetuned_tracked, excluded = shared_modules(tracked, find_tracked_modules(finetuned, model_settings.tracked_modules))
        if excluded:
            record.config["excluded_modules"] = excluded
        rows = read_queries(settings.finetune_data_path, on_skip=record.skip)
        pretrained.tracked = kept
        stages = [Stage("finetuned_model", finetuned, query_tokenizer, finetuned_tracked, rows[: settings.fit_sequences],
                        data.max_length, model_fingerprint(finetuned), rows[settings.fit_sequences : 2 * settings.fit_sequences]),
                  pretrained]
    queries, query_batch = _read_queries(query_settings, settings, query_tokenizer, data.max_length, record)
    return Problem(stages, query_batch), queries, corpus_ids


def _read_corpus(shards: Sequence[Path], data: DataSettings, settings: EvaluationSettings, tokenizer: Any,
                 record: RunRecord) -> tuple[list[str], list[Document], list[Document]]:
    """Every document id, the first ``fit_sequences`` documents that tokenize to a sequence, and the
    next ``fit_sequences`` (the held-out refinement sample)."""
    corpus_ids, head = [], []
    for document in iter_documents(shards, data.id_field, data.text_field, on_skip=record.skip, on_bad_row=data.on_bad_row):
        corpus_ids.append(document.id)
        if len(head) < 2 * settings.fit_sequences:
            head.append(document)
    kept = {doc_id for batch in batch_documents(tokenizer, head, settings.batch_size, data.max_length, record.skip) for doc_id in batch.ids}
    usable = [doc for doc in head if doc.id in kept]
    if not usable:
        raise SettingsError(f"no document of {data.path} can be used to fit the Gauss-Newton matrix")
    return corpus_ids, usable[: settings.fit_sequences], usable[settings.fit_sequences : 2 * settings.fit_sequences]


def _read_queries(query_settings: QuerySettings, settings: EvaluationSettings, tokenizer: Any, max_length: int,
                  record: RunRecord) -> tuple[list[Query], TokenBatch]:
    """The first ``num_queries`` queries, all in one batch."""
    queries = read_queries(query_settings.path, on_skip=record.skip)[: settings.num_queries]
    batches = list(batch_queries(tokenizer, queries, max(1, len(queries)), max_length, record.skip))
    if not batches:
        raise SettingsError(f"no usable query in {query_settings.path}")
    kept = set(batches[0].ids)
    return [q for q in queries if q.id in kept], batches[0]


def _candidate_batches(shards: Sequence[Path], data: DataSettings, sets: CandidateSets, tokenizer: Any, batch_size: int) -> Candidates:
    wanted = sets.all_ids
    documents = (doc for doc in iter_documents(shards, data.id_field, data.text_field, on_skip=_already_recorded,
                                               on_bad_row=data.on_bad_row) if doc.id in wanted)
    batches = list(batch_documents(tokenizer, documents, batch_size, data.max_length, _already_recorded))
    return Candidates(batches, list(itertools.chain.from_iterable(batch.ids for batch in batches)), sets)


def _bm25_scores(bm25: Bm25Ranking, candidates: Candidates, query_ids: Sequence[str], corpus_size: int) -> CandidateScores:
    """BM25 as a method: its scores of the candidates (0 where no word is shared); its pair-wise
    time is the retrieval time over the whole corpus per (document, query) pair."""
    scores = np.array([[bm25.score(q, d) for q in query_ids] for d in candidates.doc_ids], dtype=np.float64)
    return CandidateScores(scores, bm25.query_seconds * len(candidates.doc_ids) / max(1, corpus_size))


def _damping_label(problem: Problem, damping: Damping) -> str:
    return ", ".join(f"{stage.name} {value:.3e}" for stage, value in zip(problem.stages, damping))


def _truth_detail(truth: GroundTruth, damping: Damping) -> str:
    if truth.info.get("kind") == "dense":
        return "ground truth: dense solve"
    k = truth.dampings.index(damping)
    cached = ", cached" if "cached" in truth.info else ""
    solver = "CG" if truth.info.get("preconditioner", "none") == "none" else f"{truth.info['preconditioner']}-preconditioned CG"
    parts = []
    for stage in truth.info["stages"]:
        iterations, residuals = stage["iterations"][k], stage["relative_residuals"][k]
        parts.append(f"{stage['stage']} {min(iterations)}-{max(iterations)} iterations, relative residual <= {max(residuals):.1e}")
    chained = "two chained solves, " if len(parts) > 1 else ""
    return f"ground truth: {chained}{solver}, " + "; ".join(parts) + cached


def _already_recorded(skip: Any) -> None:
    """An earlier pass over the same documents recorded this skip."""
