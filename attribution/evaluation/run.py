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
from attribution.evaluation.gauss_newton import GaussNewton, use_eager_attention
from attribution.evaluation.ground_truth import GroundTruth, cached_solve
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
from attribution.evaluation.parameters import ParameterLayout
from attribution.evaluation.problem import Problem
from attribution.evaluation.scores import (
    CandidateScores,
    factors_from_gradients,
    score_candidates,
)
from attribution.evaluation.table import MetricsRow, format_rows, metrics_table
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.runs import RunRecord
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
    structure: CurvatureStructure
    metrics_path: Path
    run_record: Path

    def report(self) -> str:
        lines = [format_rows(self.rows)]
        lines += [f"Spearman {pair}: {value:.3f}" for pair, value in self.comparisons.items()]
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
    model, tokenizer = load_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype),
                                  resolve_device(model_settings.device))
    # Every method runs on the same attention implementation as the Gauss-Newton products.
    use_eager_attention(model)
    tracked = find_tracked_modules(model, model_settings.tracked_modules)
    fingerprint = model_fingerprint(model)
    record.fingerprints["model"] = fingerprint
    shards = list_shards(data_settings.path)

    corpus_ids, fit_documents = _read_corpus(shards, data_settings, settings, tokenizer, record)
    queries, query_batch = _read_queries(query_settings, settings, tokenizer, data_settings.max_length, record)
    problem = Problem(model, tokenizer, tracked, fit_documents, query_batch, data_settings.max_length, fingerprint)
    bm25 = bm25_ranking(queries, data_settings, shards, output_dir / "prefilter" / "bm25", len(corpus_ids), _already_recorded)
    bm25_top = {query.id: bm25.top(query.id, settings.bm25_top) for query in queries}
    sets = candidate_sets(queries, corpus_ids, bm25_top, settings.random_documents, settings.correlation_documents, settings.seed)
    candidates = _candidate_batches(shards, data_settings, sets, tokenizer, settings.batch_size)
    record.lap("setup")

    fitted: dict[tuple[str, str], FactorMethod] = {}

    def factor_method(kind: str, modules: str) -> FactorMethod:
        if (kind, modules) not in fitted:
            fitted[(kind, modules)] = FactorMethod(kind, modules, problem, settings.batch_size, settings.seed)
        return fitted[(kind, modules)]

    mean_eigenvalue = factor_method("ekfac", "all").mean_eigenvalue()
    unit = mean_eigenvalue if settings.damping.relative else 1.0
    dampings = [value * unit for value in settings.damping.values]
    truth = cached_solve(problem, settings.ground_truth, dampings, settings.batch_size, output_dir / "ground_truth", settings.progress,
                         factor_method("ekfac", "all").factor_set)
    record.lap("ground_truth")
    # Why per-module methods can or cannot follow the truth on this model (M products of Q columns).
    structure = curvature_structure(GaussNewton(model, tracked, problem.fit_batches(settings.batch_size)),
                                    problem.query_vectors(tracked), factor_method("ekfac", "all").factor_set, seed=settings.seed)
    record.lap("curvature_structure")

    evaluator = Evaluator(problem, candidates, queries, settings.recall_k)
    layout = ParameterLayout(tracked)
    rows: list[MetricsRow] = []
    comparisons: dict[str, float] = {}
    stability: dict[str, float] = {}
    for damping in dampings:
        relative = damping / mean_eigenvalue
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
            stability[f"{damping:.3e}"] = moved
            detail += (f"; Spearman with the iterate at {truth.info['snapshot_tolerance']:.0e}: {moved:.3f} "
                       f"({int(reached.sum())} of {len(reached)} queries reached it)")
        rows.append(evaluator.row(settings.ground_truth.kind, damping, relative, exact, exact.scores, truth.seconds, detail))
        rows.append(evaluator.row("bm25", damping, relative, _bm25_scores(bm25, candidates, problem.query_ids, len(corpus_ids)),
                                  exact.scores, bm25.build_seconds, "BM25 of prompt + completion (prefilter index); no curvature"))
        method_scores: dict[str, np.ndarray] = {}
        overheads: dict[str, float] = {}
        # LiSSA at equal time needs its reference's overhead first: run it after every factor method.
        for spec in sorted(settings.methods, key=lambda spec: spec.kind == "lissa"):
            if spec.kind == "lissa":
                budget = None if spec.max_iterations is not None else overheads[spec.equal_time_to]
                prepared = prepare_lissa(spec, problem, damping, budget, settings.seed)
            elif spec.kind == "block_exact":
                prepared = prepare_block_exact(spec, problem, damping, settings.ground_truth, settings.batch_size)
            else:
                prepared = factor_method(spec.kind, spec.tracked_modules).prepare(spec, damping)
            scores = evaluator.score(prepared, spec.tracked_modules)
            method_scores[spec.name], overheads[spec.name] = scores.scores, prepared.overhead_seconds
            detail = prepared.detail + ("; no damping" if spec.kind == "identity" else "")
            rows.append(evaluator.row(spec.name, damping, relative, scores, exact.scores, prepared.overhead_seconds, detail))
        for name, reference in settings.compare:
            comparisons[f"{name} vs {reference} (damping {damping:.2e})"] = mean_per_query(
                method_scores[name][evaluator.correlation_rows], method_scores[reference][evaluator.correlation_rows])
        record.lap(f"methods at damping {damping:.3e}")

    metrics_path = write_part(metrics_table(rows, record.run_id), output_dir / "metrics", record.run_id)
    record.outputs["metrics"] = str(metrics_path)
    record.counts = {
        "fit_sequences": len(fit_documents),
        "queries": len(problem.query_ids),
        "candidate_documents": len(candidates.doc_ids),
        "correlation_documents": len(evaluator.correlation_rows),
        "corpus_documents": len(corpus_ids),
    }
    record.config["resolved"] = {
        "model": asdict(model_settings), "data": asdict(data_settings), "queries": asdict(query_settings),
        "evaluate": asdict(settings), "modules": [m.name for m in tracked],
        "mean_eigenvalue": mean_eigenvalue, "dampings": dampings,
        "ground_truth": truth.info, "ground_truth_seconds": truth.seconds,
        "ground_truth_stability_spearman": stability, "comparisons": comparisons,
        "curvature_structure": structure.as_dict(),
        "missing_sources": sets.missing_sources,
        "rerank_sizes": {q: len(ids) for q, ids in sets.rerank.items()},
    }
    record_path = record.write(output_dir)
    return EvaluationSummary(rows, comparisons, structure, metrics_path, record_path)


def _read_corpus(shards: Sequence[Path], data: DataSettings, settings: EvaluationSettings, tokenizer: Any,
                 record: RunRecord) -> tuple[list[str], list[Document]]:
    """Every document id, and the first ``fit_sequences`` documents that tokenize to a sequence."""
    corpus_ids, head = [], []
    for document in iter_documents(shards, data.id_field, data.text_field, on_skip=record.skip):
        corpus_ids.append(document.id)
        if len(head) < settings.fit_sequences:
            head.append(document)
    kept = {doc_id for batch in batch_documents(tokenizer, head, settings.batch_size, data.max_length, record.skip) for doc_id in batch.ids}
    fit_documents = [doc for doc in head if doc.id in kept]
    if not fit_documents:
        raise SettingsError(f"no document of {data.path} can be used to fit the Gauss-Newton matrix")
    return corpus_ids, fit_documents


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
    documents = (doc for doc in iter_documents(shards, data.id_field, data.text_field, on_skip=_already_recorded) if doc.id in wanted)
    batches = list(batch_documents(tokenizer, documents, batch_size, data.max_length, _already_recorded))
    return Candidates(batches, list(itertools.chain.from_iterable(batch.ids for batch in batches)), sets)


def _bm25_scores(bm25: Bm25Ranking, candidates: Candidates, query_ids: Sequence[str], corpus_size: int) -> CandidateScores:
    """BM25 as a method: its scores of the candidates (0 where no word is shared); its pair-wise
    time is the retrieval time over the whole corpus per (document, query) pair."""
    scores = np.array([[bm25.score(q, d) for q in query_ids] for d in candidates.doc_ids], dtype=np.float64)
    return CandidateScores(scores, bm25.query_seconds * len(candidates.doc_ids) / max(1, corpus_size))


def _truth_detail(truth: GroundTruth, damping: float) -> str:
    if truth.info.get("kind") == "dense":
        return "ground truth: dense solve"
    iterations = truth.info["iterations"]
    residuals = truth.info["relative_residuals"][str(damping)]
    cached = ", cached" if "cached" in truth.info else ""
    solver = "CG" if truth.info.get("preconditioner", "none") == "none" else f"{truth.info['preconditioner']}-preconditioned CG"
    if "iterations_per_damping" in truth.info:
        iterations = truth.info["iterations_per_damping"][str(damping)]
    return (f"ground truth: {solver}, {min(iterations)}-{max(iterations)} iterations, "
            f"relative residual <= {max(residuals):.1e}{cached}")


def _already_recorded(skip: Any) -> None:
    """An earlier pass over the same documents recorded this skip."""
