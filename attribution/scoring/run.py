"""The score workflow, step by step.

1. **Candidates**: with a prefilter, each query's documents (:mod:`attribution.prefilter`); a
   gradient index's query side leaves its factors for step 4, so queries are preconditioned once.
   With ``score.keep_sketches``, the gradient index the pass adds to is created or checked
   (:mod:`attribution.sketch.riding`).
2. **Workers**: this process or a Ray pool loads the stages (models, factor stores) once per worker.
3. **Run key**: a hash of the inputs; one run holds a key at a time (a lock in its work
   directory), and a key already finished is read back, not scored again.
4. **Tasks**: query batches (factors computed once, on a worker, stored as safetensors) and
   (pass, shard) units, scheduled with retries (:mod:`attribution.scoring.execution`); every
   finished piece stays in the work directory, so a rerun resumes.
5. **Merge**: the units' kept rows into ``scores/<run_id>.parquet`` (and
   ``token_scores/<run_id>.parquet``), or with ``score.top_k=all`` the pairs files into
   ``pairs/run_id=<run_id>/``; the shards whose sketches were kept join the gradient index; then
   ``runs/<run_id>.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attribution.data.corpus import Skip, list_shards
from attribution.data.queries import read_queries
from attribution.distributed.cluster import peak_memory_mib
from attribution.lock import OutputLock, OutputLocked
from attribution.prefilter.candidates import Candidates, retrieve_candidates
from attribution.prefilter.manifest import IndexManifest
from attribution.prefilter.scores import run_prefilter_scores
from attribution.runs import RunRecord
from attribution.scoring.execution import Failures, QueryTask, Schedule, Task
from attribution.scoring.executors import executor
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, UnitOutcome, WorkUnit, file_fingerprint, run_key
from attribution.scoring.merge import PassUnits, merge_top_tables, publish_pairs, remove_work
from attribution.scoring.query_files import read_query_header
from attribution.scoring.summary import ScoreSummary, finished_summary
from attribution.scoring.tasks import QueryPlan, pass_batches
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from attribution.sketch.index import QuerySketches
from attribution.sketch.queries import query_sketcher
from attribution.sketch.riding import add_kept_shards, prepare_index

NON_FINITE_QUERY = "non-finite query gradient (NaN or Inf)"


class ShardFailure(RuntimeError):
    """Tasks that failed on every attempt; the run record lists them with their errors."""


class ScoreRunLocked(OutputLocked):
    """Another score run with the same inputs is writing to this output directory."""


class ScoreRunLock(OutputLock):
    job = "score run"
    error = ScoreRunLocked

    def how_to_clear(self) -> str:
        return ("It scores the same inputs into the same output directory: wait for it to finish (a rerun then reads "
                f"its tables back), or, if no score run is running, delete {self.path}.")


def run_score(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    query_settings: QuerySettings,
    score_settings: ScoreSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    finetune_settings: FinetuneSettings = FinetuneSettings(),
    prefilter_settings: PrefilterSettings = PrefilterSettings(),
    cluster: ClusterSettings = ClusterSettings(num_workers=0),
    shards: Sequence[Path] | None = None,
    refine_settings: RefineSettings = RefineSettings(),
) -> ScoreSummary:
    """Score every query against the corpus (or its prefilter candidates) and write the tables.

    ``shards`` restricts the run to these shards (the nightly sweep's new ones) instead of
    every shard of ``data.path``.
    """
    inputs = ScoreInputs(model_settings, data_settings, factor_settings, query_settings, score_settings,
                         finetune_settings, prefilter_settings, cluster, refine_settings)
    if score_settings.method == "prefilter":
        return run_prefilter_scores(data_settings, query_settings, score_settings, prefilter_settings, output_dir, config,
                                    gradient_queries(inputs, Path(output_dir)))
    return score(inputs, Path(output_dir), config, shards)


def score(inputs: ScoreInputs, output_dir: Path, config: dict[str, Any], shards: Sequence[Path] | None = None) -> ScoreSummary:
    """The workflow of the module docstring, on one bundle of settings."""
    if inputs.model.path is None or inputs.data.path is None or inputs.queries.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the jobs fill them in with the demo)")
    record = RunRecord(job="score", config=config)
    shard_list = list(shards) if shards is not None else list_shards(inputs.data.path)
    with staged_query_factors(inputs, output_dir) as staged:
        candidates = prefilter_candidates(inputs, shard_list, output_dir, staged)
        if inputs.score.keep_sketches:
            prepare_index(inputs, output_dir, shard_list)
            record.lap("sketch index")
        with executor(inputs, output_dir, candidates) as pool:
            identity = pool.identity()
            store = MarkerStore(output_dir, run_key(key_inputs(inputs, identity, shard_list)))
            with ScoreRunLock(store.lock_path) as lock:
                finished = store.complete()
                if finished is not None:
                    return finished_summary(finished, identity.method)
                record.config["lock_messages"] = lock.messages
                adopt_query_batches(staged, store)
                plan = pool.query_plan()
                run = _Run(inputs, output_dir, store, record, shard_list, candidates, plan, identity)
                record.lap("setup")
                schedule = Schedule(plan.num_batches, inputs.score.query_batches_per_pass, run.written_batches(), run.release)
                failures = pool.run(schedule, store, run.done)
                run.progress.close()
                record.config["workers"] = pool.worker_records()
                record.config["lost_workers"] = pool.lost_workers()
                record.lap("score")
                return run.finish(schedule, failures)


@contextmanager
def staged_query_factors(inputs: ScoreInputs, output_dir: Path) -> Iterator[Path | None]:
    """With a gradient prefilter the query side runs before the run's workers start, to sketch the
    queries; its factors wait in this directory to become the run's query batches
    (:func:`adopt_query_batches`), so each query is preconditioned once. Removed when the run ends."""
    if inputs.prefilter.kind != "gradient":
        yield None
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".query-factors-", dir=output_dir))
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def adopt_query_batches(staged: Path | None, store: MarkerStore) -> None:
    """Staged query batch ``i`` becomes the run's batch ``i``: the same queries, batched the same way, by
    stages built from the same settings; a batch the run already holds (a resumed run) is kept."""
    if staged is None:
        return
    for path in staged.glob("*.safetensors"):
        target = store.query_batch_path(int(path.stem))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


def prefilter_candidates(inputs: ScoreInputs, shards: Sequence[Path], output_dir: Path,
                         staged: Path | None = None) -> Candidates | None:
    """Per query, the documents influence may rank (None: all of them); a gradient index's query side
    leaves its factors in ``staged``."""
    if inputs.prefilter.kind == "none":
        return None
    queries = read_queries(inputs.queries.path, on_skip=lambda skip: None)  # the query plan records the skips
    return retrieve_candidates(inputs.prefilter, queries, shards, output_dir, gradient_queries(inputs, output_dir, staged))


def gradient_queries(inputs: ScoreInputs, output_dir: Path, staged: Path | None = None
                     ) -> Callable[[IndexManifest, Path], QuerySketches]:
    """How a gradient index's queries are sketched: with this run's model, store and preconditioning."""
    return lambda manifest, directory: query_sketcher(inputs, directory, manifest, output_dir, staged)


def key_inputs(inputs: ScoreInputs, identity: StageIdentity, shards: Sequence[Path]) -> dict[str, Any]:
    """Everything that determines a run's rows; the worker count and the memory settings are not part of it."""
    return {
        "fingerprints": identity.fingerprints,
        "modules": identity.modules,
        "damping": identity.damping,
        "queries": [file_fingerprint(path) for path in list_shards(inputs.queries.path)],
        "shards": [file_fingerprint(shard) for shard in shards],
        "data": asdict(inputs.data),
        "score": {**asdict(inputs.score), "progress": None},
        "prefilter": asdict(inputs.prefilter),
        "refine": inputs.refine.scoring_settings(),
    }


class _Run:
    """The driver's bookkeeping of one run: units released per pass, skips, diagnostics, counts."""

    def __init__(self, inputs: ScoreInputs, output_dir: Path, store: MarkerStore, record: RunRecord, shards: list[Path],
                 candidates: Candidates | None, plan: QueryPlan, identity: StageIdentity) -> None:
        self.inputs = inputs
        self.output_dir = output_dir
        self.store = store
        self.record = record
        self.shards = shards
        self.candidates = candidates
        self.plan = plan
        self.method = identity.method
        self.passes: dict[int, PassUnits] = {}
        self.resumed = 0
        self._skipped: set[tuple[str | None, str, str]] = set()
        record.fingerprints = dict(identity.fingerprints)
        record.config.update(modules=identity.modules, excluded_modules=identity.excluded_modules,
                             damping=identity.damping, refinement=identity.refinement, query_diagnostics={})
        for skip in plan.skips:
            self.skip(skip)
        written = len(self.written_batches())
        self.batches_resumed = written
        self.progress = tqdm(total=plan.num_batches - written, unit="task", desc="score: query batches, then units",
                             disable=not inputs.score.progress)

    def skip(self, skip: Skip) -> None:
        """Each skip once, although every pass streams the corpus again."""
        key = (skip.item_id, skip.shard, skip.reason)
        if key not in self._skipped:
            self._skipped.add(key)
            self.record.skip(skip)

    def batches(self, group: int) -> range:
        return pass_batches(group, self.inputs.score.query_batches_per_pass, self.plan.num_batches)

    def written_batches(self) -> set[int]:
        return {index for index in range(self.plan.num_batches) if self.store.query_batch_path(index).is_file()}

    def release(self, group: int) -> list[WorkUnit]:
        """Pass ``group``'s units still to score, once its query batches are written."""
        kept: list[str] = []
        for index in self.batches(group):
            header = read_query_header(self.store.query_batch_path(index))
            kept += header.query_ids
            for query_id in header.rejected:
                self.skip(Skip(query_id, str(self.inputs.queries.path), None, NON_FINITE_QUERY))
            self.record.config["query_diagnostics"].update(header.diagnostics_by_query())
        holding = None if self.candidates is None else set(self.candidates.union(kept).values())
        units = [WorkUnit(group, index, str(shard)) for index, shard in enumerate(self.shards)
                 if kept and (holding is None or str(shard) in holding)]
        self.passes[group] = PassUnits(len(kept), units)
        pending = [unit for unit in units if not self.store.done(unit)]
        self.resumed += len(units) - len(pending)
        self.progress.total += len(pending)
        self.progress.refresh()
        return pending

    def done(self, task: Task) -> None:
        self.progress.update()

    def finish(self, schedule: Schedule, failures: Failures) -> ScoreSummary:
        """Counts, the failure policy, the tables and the run record."""
        inputs, record, num_batches = self.inputs, self.record, self.plan.num_batches
        failed_units = [task for task in failures if isinstance(task, WorkUnit)]
        failed_batches = [task for task in failures if isinstance(task, QueryTask)]
        record.config["failed_units"] = [_failure(task, error) for task, error in failures.items()]
        finished = {group: PassUnits(p.num_queries, [u for u in p.units if u not in failures]) for group, p in
                    sorted(self.passes.items())}
        outcomes = {unit: self.store.outcome(unit) for p in finished.values() for unit in p.units}
        for outcome in outcomes.values():
            for skip in outcome.skips:
                self.skip(skip)
        record.counts = self._counts(schedule, outcomes)
        plans = {}
        for unit in sorted(outcomes):
            plans.setdefault(unit.group, outcomes[unit].contraction_plan)
        first = next(iter(plans.values()), {})
        record.config["contraction_plan"] = first
        record.config["contraction_plan_by_pass"] = {str(group): plan for group, plan in plans.items() if plan != first}
        record.config["task_seconds"] = {
            "query_batches": round(sum(read_query_header(self.store.query_batch_path(i)).seconds
                                       for i in self.written_batches()), 3),
            "units": round(sum(o.seconds for o in outcomes.values()), 3),
            "units_forward_backward": round(sum(o.forward_backward_seconds for o in outcomes.values()), 3),
        }
        record.config["resolved_settings"] = inputs.resolved()
        notes = []
        if inputs.score.all_pairs and inputs.score.token_scores:
            notes.append("no token scores with score.top_k=all (the pairs dataset has no token table)")
        if inputs.score.all_pairs and inputs.score.bottom_k:
            notes.append("score.bottom_k is implied by score.top_k=all (every pair is written)")
        notes.extend(_rows_beyond_documents(inputs.score, self._documents_per_query(record.counts)))
        if inputs.score.normalize:
            notes.append("score.normalize: every score (its layer and token parts too) is divided by its document's "
                         "gradient norm")
        record.config["notes"] = notes
        if self.candidates is not None:
            record.counts.update(self.candidates.counts())
            record.config["prefilter_candidates"] = self.candidates.describe()
        if failed_batches or (failed_units and not inputs.cluster.allow_failed_shards):
            record_path = record.write(self.output_dir)
            what = []
            if failed_batches:
                indices = ", ".join(str(task.index) for task in sorted(failed_batches))
                what.append(f"{len(failed_batches)} query batch(es) failed on every attempt (query batches: {indices})")
            if failed_units:
                shards = ", ".join(sorted({unit.shard for unit in failed_units}))
                what.append(f"{len(failed_units)} unit(s) failed on every attempt (shards: {shards})")
            raise ShardFailure(f"{'; '.join(what)}; nothing was written but the run record {record_path}; rerun to retry "
                               "them" + ("" if failed_batches else ", or set cluster.allow_failed_shards=true"))
        output_dir = self.output_dir
        tokens_path = None
        if inputs.score.all_pairs:
            batches_of = {group: pass_batches(group, inputs.score.query_batches_per_pass, num_batches) for group in self.passes}
            scores_path = publish_pairs(self.store, failed_units, batches_of, record.run_id, output_dir)
            record.outputs = {"pairs": str(scores_path)}
        else:
            scores_path, tokens_path = merge_top_tables(self.store, list(finished.values()), record.run_id, self.method,
                                                        inputs.score, output_dir)
            record.outputs = {"scores": str(scores_path), **({"token_scores": str(tokens_path)} if tokens_path else {})}
        if inputs.score.keep_sketches:
            kept = add_kept_shards(inputs, output_dir, self.shards)
            record.outputs["gradient_index"] = str(kept.directory)
            notes.append(kept.note())
        record.lap("merge")
        record.config["driver_peak_memory_mib"] = round(peak_memory_mib(), 1)
        record_path = record.write(output_dir)
        self.store.mark_complete(record_path)
        remove_work(self.store)
        candidates = None
        if self.candidates is not None:
            candidates = f"{self.candidates.kind} top-{self.candidates.top_m} candidates"
        refine = inputs.refine
        refined = f"refined by {refine.method}, at most {refine.steps} steps" if refine.enabled else "closed form"
        return ScoreSummary(record.run_id, self.method, scores_path, tokens_path, record_path, record.counts,
                            sum(record.timings.values()), all_pairs=inputs.score.all_pairs, candidates=candidates,
                            notes=tuple(notes), query_side=None if self.method == "identity" else refined)

    def _documents_per_query(self, counts: dict[str, int]) -> int:
        """How many documents each query is ranked against: the corpus scored, or at most its candidates."""
        if self.candidates is None:
            return counts["documents_scored"]
        return min(self.candidates.top_m, counts["documents_scored"])

    def _counts(self, schedule: Schedule, outcomes: dict[WorkUnit, UnitOutcome]) -> dict[str, int]:
        """Queries, documents (distinct), document passes (one per document and pass) and pairs scored."""
        if self.candidates is not None:
            distinct = len({doc_id for outcome in outcomes.values() for doc_id in outcome.scored_ids or []})
        else:
            per_shard: dict[int, int] = {}
            for unit, outcome in outcomes.items():
                per_shard[unit.shard_index] = max(per_shard.get(unit.shard_index, 0), outcome.documents_scored)
            distinct = sum(per_shard.values())
        return {
            "queries": self.plan.num_queries,
            "queries_scored": sum(p.num_queries for p in self.passes.values()),
            "query_batches": self.plan.num_batches,
            "query_batches_resumed": self.batches_resumed,
            "passes": schedule.num_groups,
            "units": sum(len(p.units) for p in self.passes.values()),
            "units_resumed": self.resumed,
            "documents_scored": distinct,
            "document_passes": sum(o.documents_scored for o in outcomes.values()),
            "pairs_scored": sum(o.pairs_scored for o in outcomes.values()),
            "skipped": len(self.record.skips),
            "shards": len(self.shards),
        }


def _rows_beyond_documents(score: ScoreSettings, documents: int) -> list[str]:
    """What a user asking for more rows than there are documents should know about the table."""
    if score.all_pairs or score.top_k + score.bottom_k <= documents:
        return []
    if score.top_k >= documents:
        repeats = (f", and the {score.bottom_k} bottom rows repeat documents of the top rows" if score.bottom_k else "")
        return [f"score.top_k={score.top_k} is more than the {documents} documents each query is ranked against: "
                f"every document is kept{repeats}"]
    return [f"score.top_k={score.top_k} + score.bottom_k={score.bottom_k} is more than the {documents} documents each "
            f"query is ranked against: some documents are both top and bottom rows"]


def _failure(task: Task, error: str) -> dict[str, Any]:
    if isinstance(task, QueryTask):
        return {"query_batch": task.index, "error": error}
    return {"pass": task.group, "shard": task.shard, "error": error}
