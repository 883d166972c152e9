"""The long-lived Ray actors of a score run: :class:`~attribution.scoring.tasks.ScoreTasks` in a worker of the
pool, or in one of the workers that shard the models between them."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from attribution.distributed.cluster import GroupMember, TorchCollective, peak_memory_mib, prepare_worker_process
from attribution.prefilter.candidates import Candidates
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.tasks import QueryPlan, ScoreTasks


@ray.remote
class ScoreWorker:
    """Loads the stages once, then computes query batches and scores units, each written to the work directory."""

    def __init__(self, inputs: ScoreInputs, output_dir: str, candidates: Candidates | None,
                 product_workers: dict[str, list] | None = None) -> None:
        prepare_worker_process()
        self.tasks = ScoreTasks(inputs, output_dir, candidates, product_workers=product_workers)

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


@ray.remote
class ShardedScoreWorker(GroupMember):
    """One of the ``cluster.num_workers`` workers that hold the models sharded between them (``cluster.sharding``).

    They join one torch.distributed process group, load and shard the stages together, and then run
    every task in lockstep (:class:`~attribution.scoring.sharded_execution.ShardedExecutor`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tasks: ScoreTasks | None = None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def join(self, rank: int, world_size: int, address: str, port: int, inputs: ScoreInputs, output_dir: str,
             candidates: Candidates | None) -> None:
        """Join the group, then load the stages with every model sharded over it."""
        self.join_group(rank, world_size, address, port, inputs.model.device)
        self.tasks = ScoreTasks(inputs, output_dir, candidates, TorchCollective())

    def identity(self) -> StageIdentity:
        return self._tasks.identity()

    def query_plan(self) -> QueryPlan:
        return self._tasks.query_plan()

    def compute_query_batch(self, store: MarkerStore, index: int) -> None:
        self._tasks.compute_query_batch(store, index)

    def score_unit(self, store: MarkerStore, unit: WorkUnit | None, batches: Sequence[int]) -> None:
        self._tasks.score_unit(store, unit, batches)

    def footprint(self) -> dict[str, float]:
        """Peak resident memory and the parameter elements this worker holds."""
        return {"peak_memory_mib": round(peak_memory_mib(), 1), "parameters_held": self._tasks.parameters_held()}

    @property
    def _tasks(self) -> ScoreTasks:
        assert self.tasks is not None, "join the group first"
        return self.tasks
