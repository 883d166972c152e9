"""The long-lived Ray actor of the scoring pool: :class:`~attribution.scoring.tasks.ScoreTasks` in a worker."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from attribution.distributed.cluster import peak_memory_mib, prepare_worker_process
from attribution.prefilter.candidates import Candidates
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.tasks import QueryPlan, ScoreTasks


@ray.remote
class ScoreWorker:
    """Loads the stages once, then computes query batches and scores units, each written to the work directory."""

    def __init__(self, inputs: ScoreInputs, output_dir: str, candidates: Candidates | None) -> None:
        prepare_worker_process()
        self.tasks = ScoreTasks(inputs, output_dir, candidates)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def identity(self) -> StageIdentity:
        return self.tasks.identity()

    def query_plan(self) -> QueryPlan:
        return self.tasks.query_plan()

    def compute_query_batch(self, store: MarkerStore, index: int) -> None:
        self.tasks.compute_query_batch(store, index)

    def score_unit(self, store: MarkerStore, unit: WorkUnit, batches: Sequence[int]) -> None:
        self.tasks.score_unit(store, unit, batches)

    def peak_memory_mib(self) -> float:
        return peak_memory_mib()
