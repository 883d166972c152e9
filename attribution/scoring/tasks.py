"""The work of a score run, as one process does it: in the driver (``cluster.num_workers=0``) or in
each Ray worker. The process loads the stages once, then runs tasks of two kinds:

- a *query batch*: its preconditioned factors, computed once and stored as safetensors in the
  run's work directory (:mod:`attribution.scoring.query_files`);
- a *unit*: the query batches of one pass against one shard (:class:`ShardScorer`); the pass's
  factors are read from their files when the process first needs them and kept for the
  following units of that pass.

Passes are consecutive runs of ``score.query_batches_per_pass`` query batches, so memory here
holds one pass's factors however many queries the run has.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attribution.curvature.fit import Collective
from attribution.data.batching import TokenBatch, batch_queries
from attribution.data.corpus import Skip
from attribution.data.queries import read_queries
from attribution.distributed.sharding import parameters_held
from attribution.prefilter.candidates import Candidates
from attribution.scoring.candidates import CandidateScorer, ghost_pass
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.query_factors import concatenate
from attribution.scoring.query_files import load_query_factors, save_query_batch
from attribution.scoring.shards import Lockstep, PassQueries, ShardScorer, inject_fault_for_tests
from attribution.scoring.stages import build_stages
from attribution.settings import resolve_device, torch_dtype
from attribution.sketch.riding import KeptSketches


@dataclass
class QueryPlan:
    """How the queries split into batches, and those left out before any gradient (over-long, empty)."""

    num_queries: int
    num_batches: int
    skips: list[Skip] = field(default_factory=list)


def pass_batches(group: int, per_pass: int, num_batches: int) -> range:
    """The query batches of pass ``group``."""
    return range(group * per_pass, min((group + 1) * per_pass, num_batches))


class ScoreTasks:
    """A process's models, stores and caches for the tasks of one score run."""

    def __init__(self, inputs: ScoreInputs, output_dir: str | Path, candidates: Candidates | None,
                 collective: Collective | None = None, product_workers: dict[str, list] | None = None) -> None:
        """``collective``: the workers this one shards the models with (``cluster.sharding``), or None;
        ``product_workers``: the Ray workers of ``refine.workers``, per refined stage."""
        self.inputs = inputs
        self.output_dir = Path(output_dir)
        self.collective = collective
        device = resolve_device(inputs.model.device)
        sharding = inputs.cluster.sharding if collective is not None else "none"
        self.stages = build_stages(inputs.model, inputs.factors, inputs.finetune, inputs.refine, self.output_dir, device,
                                   sharding, product_workers)
        lockstep = None
        if collective is not None:
            model, tracked = self.stages.candidate_model, self.stages.tracked
            lockstep = Lockstep(collective, lambda batch: ghost_pass(model, tracked, batch))
        kept = None
        if inputs.score.keep_sketches:
            kept = KeptSketches(self.stages.candidate_model, self.stages.tracked, self.stages.fingerprints["model"], inputs,
                                self.output_dir)
        self.shards = ShardScorer(self.stages.candidate_model, self.stages.candidate_tokenizer, inputs.data,
                                  inputs.score, candidates, lockstep, kept)
        self._query_batches: list[TokenBatch] | None = None
        self._num_queries = 0
        self._skips: list[Skip] = []
        self._pass: tuple[int, PassQueries] | None = None

    def identity(self) -> StageIdentity:
        return StageIdentity.of(self.stages)

    def query_plan(self) -> QueryPlan:
        batches = self._batches()
        return QueryPlan(self._num_queries, len(batches), list(self._skips))

    def _batches(self) -> list[TokenBatch]:
        if self._query_batches is None:
            settings = self.inputs
            queries = read_queries(settings.queries.path, on_skip=self._skips.append)
            self._num_queries = len(queries)
            self._query_batches = list(batch_queries(self.stages.query_tokenizer, queries, settings.score.query_batch_size,
                                                     settings.data.max_length, self._skips.append))
        return self._query_batches

    def compute_query_batch(self, store: MarkerStore, index: int) -> None:
        """Query batch ``index``'s factors, rejected queries and diagnostics, written to its file."""
        inject_fault_for_tests("query-batch", index)
        started = time.perf_counter()
        batch = self._batches()[index]
        prepared = self.stages.query_factors(batch, self.inputs.score.rank)
        # Every worker of a sharded model computes the same batch (its passes gather from all of them); one writes it.
        if self.collective is None or self.collective.rank == 0:
            save_query_batch(store.query_batch_path(index), prepared, batch.ids, time.perf_counter() - started)

    def score_unit(self, store: MarkerStore, unit: WorkUnit | None, batches: Sequence[int]) -> None:
        """Score ``unit`` against the kept queries of ``batches`` (its pass) and write its files; no unit:
        keep step with the other workers of a sharded model."""
        if unit is None:
            self.shards.keep_step()
            return
        self.shards.run(unit, self._pass_queries(store, unit.group, batches), store)

    def parameters_held(self) -> int:
        """Parameter elements this process holds (a sharded worker: its shards)."""
        models = {id(model): model for model in (self.stages.candidate_model, self.stages.query_model)}
        return sum(parameters_held(model) for model in models.values())

    def _pass_queries(self, store: MarkerStore, group: int, batches: Sequence[int]) -> PassQueries:
        if self._pass is None or self._pass[0] != group:
            self._pass = None  # the previous pass's factors go before the next ones load
            self.stages.release_curvature()
            parts = [load_query_factors(store.query_batch_path(index)) for index in batches]
            columns, start = [], 0
            for index, part in zip(batches, parts):
                if part.query_ids:
                    columns.append((index, slice(start, start + len(part.query_ids))))
                    start += len(part.query_ids)
            score = self.inputs.score
            scorer = CandidateScorer(self.stages.candidate_model, self.stages.tracked, concatenate(parts),
                                     self.inputs.data.max_length, torch_dtype(score.dtype), score.dense_factors_mib,
                                     score.normalize)
            self._pass = (group, PassQueries(scorer, columns))
        return self._pass[1]
