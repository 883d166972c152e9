"""Run a score run's tasks on ``cluster.num_workers`` Ray workers that hold the models sharded between them.

With ``cluster.sharding`` set, each worker keeps 1/W of every model's parameters and every forward
or backward pass gathers a block's weights from all of them, so the workers cannot take tasks
independently, as the pool of :class:`~attribution.scoring.execution.RayExecutor` does: they run
in rounds, in lockstep.

- A query batch is computed by every worker at once (the same batch: the query side is small next
  to the corpus pass), and written by the first.
- A round of units hands up to W units of the schedule, one per worker; a worker with fewer
  document batches than the others, or with no unit, runs ghost passes that count for nothing
  until all are done (:meth:`~attribution.scoring.shards.ShardScorer.keep_step`).

A worker that raises or dies breaks the group (the others wait in a collective), so the whole
group is replaced, and every task of the round is attempted again, ``1 + cluster.max_retries``
times in all. A :class:`~attribution.errors.UserError` fails the job at once with its own message.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import ray

from attribution.distributed.cluster import start_group, worker_environment
from attribution.distributed.score_worker import ShardedScoreWorker
from attribution.errors import raise_user_error_of
from attribution.prefilter.candidates import Candidates
from attribution.scoring.execution import Failures, QueryTask, Schedule, Task
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.tasks import QueryPlan


class ShardedExecutor:
    """A group of ``cluster.num_workers`` workers sharing the models, replaced whole when one fails."""

    def __init__(self, inputs: ScoreInputs, output_dir: Path, candidates: Candidates | None) -> None:
        self.inputs = inputs
        self.output_dir = output_dir
        self.candidates = candidates
        self.max_retries = inputs.cluster.max_retries
        self._tasks_done: Counter = Counter()
        self._lost: list[dict] = []
        self._records: list[dict] = []
        self.workers = self._start()

    def _start(self) -> list:
        """W new workers, joined in one process group, with the stages loaded and sharded."""
        cluster = self.inputs.cluster
        options = {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker,
                   "runtime_env": {"env_vars": worker_environment()}}
        workers = [ShardedScoreWorker.options(**options).remote() for _ in range(cluster.num_workers)]
        try:
            address, port = start_group(workers, cluster.listen)
            self._wait([worker.join.remote(rank, len(workers), address, port, self.inputs, str(self.output_dir),
                                           self.candidates) for rank, worker in enumerate(workers)])
        except BaseException:
            for worker in workers:
                ray.kill(worker)
            raise
        return workers

    @staticmethod
    def _wait(calls: list) -> None:
        """Every call's result, failing at the first that fails (the others may be waiting for it in a collective);
        a user's mistake raised in a worker is raised here as itself."""
        remaining = list(calls)
        while remaining:
            (done,), remaining = ray.wait(remaining, num_returns=1)
            try:
                ray.get(done)
            except ray.exceptions.RayError as error:
                raise_user_error_of(error)
                raise

    def identity(self) -> StageIdentity:
        return ray.get(self.workers[0].identity.remote())

    def query_plan(self) -> QueryPlan:
        return ray.get(self.workers[0].query_plan.remote())

    def run(self, schedule: Schedule, store: MarkerStore, on_done: Callable[[Task], None]) -> Failures:
        attempts: Counter[Task] = Counter()
        failures: Failures = {}
        waiting: deque[Task] = deque()  # retried tasks, and a query batch that ended a round of units
        while tasks := self._round(schedule, waiting):
            try:
                self._wait(self._calls(tasks, schedule, store))
            except ray.exceptions.RayError as error:
                for task in tasks:
                    attempts[task] += 1
                    if attempts[task] <= self.max_retries:
                        waiting.append(task)
                    else:
                        failures[task] = f"attempt {attempts[task]}: {type(error).__name__}: {error}"
                        schedule.failed(task)
                self._replace()
                continue
            for worker in self.workers:
                self._tasks_done[worker] += 1
            for task in tasks:
                schedule.finished(task)
                on_done(task)
        self._records = self._describe()
        return failures

    def _round(self, schedule: Schedule, waiting: deque[Task]) -> list[Task]:
        """The next query batch alone, or the next units, up to one per worker."""
        def next_task() -> Task | None:
            return waiting.popleft() if waiting else schedule.next()

        first = next_task()
        if first is None or isinstance(first, QueryTask):
            return [] if first is None else [first]
        units: list[Task] = [first]
        while len(units) < len(self.workers) and (task := next_task()) is not None:
            if isinstance(task, QueryTask):
                waiting.appendleft(task)
                break
            units.append(task)
        return units

    def _calls(self, tasks: list[Task], schedule: Schedule, store: MarkerStore) -> list:
        if isinstance(tasks[0], QueryTask):
            return [worker.compute_query_batch.remote(store, tasks[0].index) for worker in self.workers]
        units: list[WorkUnit | None] = [*tasks, *[None] * (len(self.workers) - len(tasks))]  # type: ignore[list-item]
        return [worker.score_unit.remote(store, unit, list(schedule.batches(unit.group)) if unit is not None else [])
                for worker, unit in zip(self.workers, units)]

    def _replace(self) -> None:
        """A worker failed: the group is broken, so every worker goes and a new group loads the stages."""
        for worker in self.workers:
            self._lost.append({"node": self._node(worker), "tasks": self._tasks_done[worker]})
            ray.kill(worker)
        self.workers = self._start()

    @staticmethod
    def _node(worker) -> str | None:
        try:
            return ray.get(worker.node.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return None

    def _describe(self) -> list[dict]:
        """Each worker's node, rounds taken part in, peak memory and parameter elements held."""
        records = []
        for worker in self.workers:
            footprint = ray.get(worker.footprint.remote())
            records.append({"node": self._node(worker), "tasks": self._tasks_done[worker], **footprint})
        return records

    def worker_records(self) -> list[dict]:
        return self._records

    def lost_workers(self) -> list[dict]:
        return self._lost

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
