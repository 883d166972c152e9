"""The counterfactual validation workflow: do the scores predict what retraining does?

1. **Scores**: every method's score of every (document, query) pair from the engine
   (:mod:`attribution.counterfactual.methods`), at the headline damping, then at the other dampings
   and step budgets of the sweeps.
2. **Retraining**: the benchmark's recipe on ``lds.subsets`` random subsets with ``lds.seeds`` seeds each,
   as Ray tasks (:mod:`attribution.counterfactual.tasks`), every query measured on every model.
3. **Top-k removal**: for the first ``removal.queries`` queries, the recipe retrained without each
   query's top ``removal.fraction`` of the corpus by each method (and a random draw), against the
   recipe on the whole corpus (:mod:`attribution.counterfactual.removal`).
4. **PBRF**: the proximal response of a handful of pairs at the headline damping
   (:mod:`attribution.counterfactual.pbrf_pairs`).
5. **Table**: per method the LDS with its interval over queries (:mod:`attribution.counterfactual.lds`),
   the agreement with the PBRF, and the seconds its scores took (fit + score run); per ranking the
   mean loss increase of top-k removal with its interval.

Writes ``<output_dir>/counterfactual/<run_id>.parquet`` and ``<output_dir>/runs/<run_id>.json``;
keeps the retrained models under ``retrain/``, the engine's stores and score runs under ``engine/``
and the PBRF responses under ``pbrf/``, so a rerun redoes only what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attribution.counterfactual.benchmarks import FinetuneStage
from attribution.counterfactual.lds import linear_datamodeling_score, predicted_influence, seed_agreement
from attribution.counterfactual.methods import Damping, Engine, MethodScores, dampings
from attribution.counterfactual.pbrf import ProximalObjective
from attribution.counterfactual.pbrf_pairs import PbrfPairs, agreement, choose_documents, pbrf_pairs
from attribution.counterfactual.removal import (
    RemovalPlan,
    RemovalResult,
    format_removal,
    plan_removal,
    removal_result,
    without,
)
from attribution.counterfactual.retrain import Recipe, RetrainTask, TaskOutcome, queries_key
from attribution.counterfactual.settings import CounterfactualSettings, with_steps
from attribution.counterfactual.subsets import Subset, draw_subsets, membership
from attribution.counterfactual.table import Row, as_dicts, format_rows, table
from attribution.counterfactual.tasks import run_retraining
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import load_factors
from attribution.data.corpus import Document, iter_documents, list_shards
from attribution.data.queries import Query, read_queries
from attribution.distributed.cluster import ray_session
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine.sample import sample_batches
from attribution.runs import RunRecord
from attribution.scoring.tables import write_part
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    ModelSettings,
    QuerySettings,
    ScoreSettings,
    SettingsError,
    resolve_device,
    torch_dtype,
)


@dataclass(frozen=True)
class RetrainingCost:
    """Models of the run, how many this run trained, and the training seconds they took."""

    models: int
    trained: int
    seconds_per_model: float
    total_seconds: float
    wall_seconds: float

    def describe(self) -> str:
        return (f"retraining: {self.models} models ({self.trained} trained by this run, {self.models - self.trained} kept), "
                f"{self.seconds_per_model:.1f} s per model, {self.total_seconds:.0f} s of training in all; "
                f"{self.wall_seconds:.0f} s wall-clock this run")


@dataclass
class CounterfactualSummary:
    rows: list[Row]
    confidence: float
    retraining: RetrainingCost
    seed_agreement: float
    pbrf: PbrfPairs | None
    table_path: Path
    run_record: Path
    removal: list[RemovalResult]
    removal_retraining: RetrainingCost | None
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [format_rows(self.rows, self.confidence), self.retraining.describe(), *self.notes]
        if self.removal_retraining is not None:
            lines += [("top-k removal: increase of -log p(completion | prompt) when retrained without each query's top k "
                       "documents"), format_removal(self.removal, self.confidence),
                      f"top-k removal {self.removal_retraining.describe()}"]
        if not math.isnan(self.seed_agreement):
            lines.append(f"seed agreement (Spearman over subsets between two training seeds' measurements, mean over "
                         f"queries): {self.seed_agreement:.3f}")
        if self.pbrf is not None:
            lines.append(self.pbrf.describe())
        return "\n".join(lines)


def run_counterfactual(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    query_settings: QuerySettings,
    score_settings: ScoreSettings,
    cluster: ClusterSettings,
    recipe: Recipe,
    settings: CounterfactualSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    finetune: FinetuneStage | None = None,
) -> CounterfactualSummary:
    """The workflow of the module docstring; ``recipe`` retrains the benchmark the model and corpus come from,
    and ``finetune`` (with ``settings.finetune_stage``) is its fine-tuning stage: the queries are then measured on
    the fine-tuned retrained models."""
    if settings.finetune_stage != (finetune is not None and recipe.finetune is not None):
        raise ValueError("settings.finetune_stage, the recipe's fine-tuning stage and finetune go together")
    if model_settings.path is None or data_settings.path is None or query_settings.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the job fills them in with the benchmark's)")
    output_dir = Path(output_dir)
    record = RunRecord(job="validate_counterfactual", config=config)
    query_list = read_queries(query_settings.path, on_skip=record.skip)
    documents = list(iter_documents(list_shards(data_settings.path), data_settings.id_field, data_settings.text_field,
                                    on_skip=record.skip, on_bad_row=data_settings.on_bad_row))
    doc_ids = [doc.id for doc in documents]
    model, tokenizer = load_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype),
                                  resolve_device(model_settings.device))
    tracked = find_tracked_modules(model, model_settings.tracked_modules)
    fingerprint = model_fingerprint(model)
    record.fingerprints["model"] = fingerprint
    engine = Engine(model_settings, data_settings, query_settings, score_settings, cluster, settings.fit_sequences,
                    output_dir, doc_ids, query_list, config, tracked, finetune)
    # Room beside the score workers for the largest refine.workers of any method, per stage.
    product_workers = 2 * max((spec.refine.workers for spec in settings.methods if spec.refine.enabled), default=0)
    with _cluster(cluster, product_workers):
        mean_eigenvalue = engine.mean_eigenvalue()
        sweep = dampings(settings.damping.values, settings.damping.relative, mean_eigenvalue)
        scored = _all_scores(engine, settings, sweep)
        record.lap("scores")
        subsets = draw_subsets(doc_ids, settings.lds.fraction, settings.lds.subsets, settings.lds.seed)
        tasks = [RetrainTask(recipe, subset, seed, str(output_dir / "retrain"), str(query_settings.path),
                             queries_key(query_settings.path, data_settings.max_length), data_settings.max_length,
                             position)
                 for position, (subset, seed) in enumerate((s, k) for s in subsets for k in range(settings.lds.seeds))]
        outcomes = run_retraining(tasks, cluster, settings.progress)
        wall = record.lap("retraining")
        plan, removal_outcomes, removal_wall = None, [], 0.0
        if settings.removal.enabled:
            plan = _removal_plan(scored[: len(settings.methods)], doc_ids, engine.query_ids, settings)
            sets = plan.training_sets(doc_ids)
            removal_tasks = [RetrainTask(recipe, Subset(j, kept), seed, str(output_dir / "retrain"), str(query_settings.path),
                                         queries_key(query_settings.path, data_settings.max_length),
                                         data_settings.max_length, len(tasks) + position, "full" if j == 0 else "removal")
                             for position, (j, kept, seed) in enumerate((j, kept, k) for j, kept in enumerate(sets)
                                                                        for k in range(settings.removal.seeds))]
            removal_outcomes = run_retraining(removal_tasks, cluster, settings.progress)
            removal_wall = record.lap("top-k removal")
    measured = _measurements(outcomes, engine.query_ids, settings.lds.seeds, len(subsets))
    pairs = None
    # The PBRF is the pretrained model's response; a fine-tuned answer's has a second stage it does not model.
    if settings.pbrf.enabled and not settings.finetune_stage:
        pairs = _pbrf(model, tokenizer, tracked, fingerprint, documents, query_list, data_settings, settings, engine,
                      sweep[0], output_dir)
        record.lap("pbrf")
    matrix = membership(subsets, doc_ids)
    actual = measured.mean(axis=0)
    rows = [_row(scores, matrix, actual, engine, settings, pairs, sweep[0]) for scores in scored]
    cost = _cost(outcomes, wall)
    removal = [] if plan is None else _removal_results(plan, plan.training_sets(doc_ids), removal_outcomes, settings)
    removal_cost = None if plan is None else _cost(removal_outcomes, removal_wall)
    table_path = write_part(table(rows, record.run_id), output_dir / "counterfactual", record.run_id)
    record.outputs["table"] = str(table_path)
    record.counts = {"documents": len(doc_ids), "queries": len(engine.query_ids), "subsets": len(subsets),
                     "seeds": settings.lds.seeds, "models": cost.models, "models_trained": cost.trained,
                     "models_kept": cost.models - cost.trained,
                     "removal_models": 0 if removal_cost is None else removal_cost.models,
                     "pbrf_pairs": 0 if pairs is None else pairs.responses.size}
    agreement_value = seed_agreement(measured)
    record.config["resolved"] = {
        "model": asdict(model_settings), "data": asdict(data_settings), "queries": asdict(query_settings),
        "score": asdict(engine.score_settings), "cluster": asdict(cluster), "counterfactual": asdict(settings),
        "benchmark_fingerprint": recipe.fingerprint, "mean_eigenvalue": mean_eigenvalue,
    }
    record.config["results"] = {
        "rows": as_dicts(rows),
        "lds_per_query": {_label(s): _lds(s, matrix, actual, engine.query_ids, settings).per_query for s in scored},
        "pairs": {_label(s): s.pairs_path for s in scored if s.pairs_path is not None},
        "seed_agreement": agreement_value,
        "retraining": asdict(cost),
        "subsets": [{"index": s.index, "documents": len(s.doc_ids)} for s in subsets],
        "measurements": {"query_ids": engine.query_ids, "by_seed_subset_query": measured.tolist()},
        "models": [{"subset": o.subset, "seed": o.seed, "trained": o.trained, "seconds": o.train_seconds,
                    "final_loss": o.final_loss} for o in outcomes],
        "removal": None if plan is None else {
            "k": plan.count, "query_ids": list(plan.query_ids),
            "removed": {r: [list(t) for t in v] for r, v in plan.removed.items()},
            "results": [asdict(r) for r in removal], "retraining": asdict(removal_cost),
            "models": [{"training_set": o.subset, "seed": o.seed, "trained": o.trained, "seconds": o.train_seconds,
                        "final_loss": o.final_loss} for o in removal_outcomes]},
        "pbrf": None if pairs is None else {"doc_ids": pairs.doc_ids, "query_ids": pairs.query_ids,
                                            "responses": pairs.responses.tolist(), "solves": pairs.solves,
                                            "epsilon": pairs.epsilon, "module_damping": pairs.module_damping},
    }
    # Every model skips the same queries (too long to batch): record them once.
    record.skips += outcomes[0].skips if outcomes else []
    record_path = record.write(output_dir)
    notes = []
    if settings.finetune_stage:
        notes.append("fine-tuning stage: every query is measured on its retrained model after the benchmark's fine-tuning "
                     "recipe, and every model's seconds include it")
        if settings.pbrf.enabled:
            notes.append("PBRF: not solved with finetune_stage=true (it models the pretrained stage's response only)")
    return CounterfactualSummary(rows, settings.lds.confidence, cost, agreement_value, pairs, table_path, record_path,
                                 removal, removal_cost, notes)


@contextmanager
def _cluster(cluster: ClusterSettings, product_workers: int) -> Iterator[None]:
    """One Ray session for the score runs (and their ``product_workers``) and the retraining tasks (none with
    ``num_workers=0``: a score run with product workers starts its own)."""
    with ray_session(cluster, product_workers) if cluster.uses_ray else nullcontext():
        yield


def _all_scores(engine: Engine, settings: CounterfactualSettings, sweep: Sequence[Damping]) -> list[MethodScores]:
    """The headline scores of every method, then the damping sweep, then the step sweep."""
    scored = [engine.method_scores(spec, sweep[0]) for spec in settings.methods]
    for name in settings.damping.methods:
        scored += [engine.method_scores(settings.method(name), damping) for damping in sweep[1:]]
    steps = settings.refine_steps
    if steps.method is not None and steps.values:
        spec = settings.method(steps.method)
        scored += [engine.method_scores(with_steps(spec, value), sweep[0]) for value in steps.values
                   if value != spec.refine.steps]
    return scored


def _measurements(outcomes: Sequence[TaskOutcome], query_ids: Sequence[str], seeds: int, subsets: int) -> np.ndarray:
    """(seeds, subsets, queries) measurements; NaN for a query that could not be measured."""
    values = np.full((seeds, subsets, len(query_ids)), np.nan)
    for outcome in outcomes:
        values[outcome.seed, outcome.subset] = [outcome.measurements.get(q, np.nan) for q in query_ids]
    return values


def _removal_plan(headline: Sequence[MethodScores], doc_ids: Sequence[str], query_ids: Sequence[str],
                  settings: CounterfactualSettings) -> RemovalPlan:
    """What every ranking removes: the headline scores of ``removal.methods`` (all when null), then random."""
    chosen = settings.removal.methods
    rankings = {s.name: s.scores for s in headline if chosen is None or s.name in chosen}
    removal = settings.removal
    return plan_removal(rankings, doc_ids, query_ids, removal.queries, removal.fraction, removal.random, removal.seed)


def _removal_results(plan: RemovalPlan, sets: Sequence[tuple[str, ...]], outcomes: Sequence[TaskOutcome],
                     settings: CounterfactualSettings) -> list[RemovalResult]:
    """Delta per ranking from the (training set, seed) models; set 0 is the full corpus."""
    measured = {(o.subset, o.seed): o.measurements for o in outcomes}
    index = {kept: j for j, kept in enumerate(sets)}
    doc_ids = sets[0]
    seeds = range(settings.removal.seeds)
    full = np.array([[measured[(0, k)].get(q, np.nan) for q in plan.query_ids] for k in seeds])
    results = []
    for ranking, per_query in plan.removed.items():
        kept_sets = [index[without(doc_ids, removed)] for removed in per_query]
        removed = np.array([[measured[(j, k)].get(q, np.nan) for j, q in zip(kept_sets, plan.query_ids)] for k in seeds])
        results.append(removal_result(ranking, full, removed, plan.query_ids, plan.count, settings.lds.confidence,
                                      settings.lds.bootstrap, settings.removal.seed))
    return results


def _lds(scores: MethodScores, matrix: np.ndarray, actual: np.ndarray, query_ids: Sequence[str],
         settings: CounterfactualSettings):
    # A document the engine could not score (too short, say) adds nothing to any subset's prediction.
    predicted = predicted_influence(matrix, np.nan_to_num(scores.scores, nan=0.0))
    predicted[:, np.isnan(scores.scores).all(axis=0)] = np.nan
    usable = np.isfinite(actual).all(axis=0) & np.isfinite(predicted).all(axis=0)
    lds = settings.lds
    return linear_datamodeling_score(predicted[:, usable], actual[:, usable], [q for q, ok in zip(query_ids, usable) if ok],
                                     lds.confidence, lds.bootstrap, lds.seed)


def _row(scores: MethodScores, matrix: np.ndarray, actual: np.ndarray, engine: Engine, settings: CounterfactualSettings,
         pairs: PbrfPairs | None, headline: Damping) -> Row:
    result = _lds(scores, matrix, actual, engine.query_ids, settings)
    detail = [scores.detail]
    # A query the engine skipped (too long) has no scores at all and is left out of the LDS: count the
    # documents missing among the queries that were scored, and the skipped queries apart.
    scored_queries = ~np.isnan(scores.scores).all(axis=0)
    missing = int(np.isnan(scores.scores[:, scored_queries]).any(axis=1).sum())
    prefilter = scores.spec.prefilter
    if prefilter.kind != "none":
        detail.append(f"{prefilter.kind} top-{prefilter.top_m} candidates scored, the other pairs count as 0 "
                      "and rank last")
    elif missing:
        detail.append(f"{missing} documents not scored (count as 0)")
    if scores.spec.kind != "bm25" and not scored_queries.all():
        detail.append(f"{int((~scored_queries).sum())} queries not scored (left out)")
    found = None
    if pairs is not None and (scores.damping is None or scores.damping == headline):
        rows = [engine.doc_ids.index(d) for d in pairs.doc_ids]
        columns = [engine.query_ids.index(q) for q in pairs.query_ids]
        found = agreement(np.nan_to_num(scores.scores[np.ix_(rows, columns)], nan=0.0), pairs, scores.spec.damped)
        if scores.module_damping and scores.module_damping != pairs.module_damping:
            detail.append("its damping differs from the PBRF's (EK-FAC's)")
    damping = scores.damping
    return Row(
        method=scores.name, kind=scores.spec.kind,
        damping="-" if damping is None else damping.label,
        absolute_damping=float("nan") if damping is None or damping.absolute is None else damping.absolute,
        steps=scores.steps, lds=result.mean, lds_low=result.low, lds_high=result.high,
        queries=len(result.per_query) - result.left_out,
        pbrf_pearson=found.pearson if found else float("nan"), pbrf_spearman=found.spearman if found else float("nan"),
        pbrf_relative_error=found.relative_error if found else float("nan"),
        seconds=scores.seconds, detail="; ".join(detail),
    )


def _label(scores: MethodScores) -> str:
    """The method's name, with its damping when it has one: ``ekfac (10x)``, ``refined_cg@5 (10x)``."""
    return scores.name if scores.damping is None else f"{scores.name} ({scores.damping.label})"


def _pbrf(model: Any, tokenizer: Any, tracked: list, fingerprint: str, documents: Sequence[Document],
          query_list: Sequence[Query], data: DataSettings, settings: CounterfactualSettings, engine: Engine,
          headline: Damping, output_dir: Path) -> PbrfPairs:
    """The PBRF pairs at the headline damping, on the fit sample, per module as EK-FAC applies it."""
    folder, _ = engine.store("ekfac")
    damping = Preconditioner(load_factors(folder / "factors", tracked, fingerprint), headline.absolute).damping
    skips: list = []
    sample = sample_batches(tokenizer, str(data.path), data.max_length, data.batch_size, settings.fit_sequences, skips.append,
                            "fit_sequences")
    sequences = sum(len(batch.ids) for batch in sample)
    epsilon = settings.pbrf.epsilon if settings.pbrf.epsilon is not None else 1.0 / sequences
    chosen = choose_documents(query_list, [d.id for d in documents], settings.pbrf.documents, settings.pbrf.seed)
    by_id = {d.id: d for d in documents}
    queries = list(query_list[: settings.pbrf.queries])
    objective = ProximalObjective(model, tracked, sample, damping)
    identity = {"model": fingerprint, "damping": damping, "sample": [i for b in sample for i in b.ids],
                "max_length": data.max_length}
    return pbrf_pairs(objective, [by_id[d] for d in chosen], queries, tokenizer, data.max_length, settings.pbrf, epsilon,
                      output_dir / "pbrf", identity)


def _cost(outcomes: Sequence[TaskOutcome], wall: float) -> RetrainingCost:
    seconds = [o.train_seconds for o in outcomes]
    return RetrainingCost(len(outcomes), sum(o.trained for o in outcomes), float(np.mean(seconds)) if seconds else 0.0,
                          float(sum(seconds)), wall)
