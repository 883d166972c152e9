"""Run a score run's tasks with retries: in this process, or on a pool of long-lived Ray workers.

Tasks are query batches (:class:`QueryTask`) and units (:class:`WorkUnit`); a pass's units
become ready once every query batch of the pass has its factors file. The :class:`Schedule`
hands out ready tasks in pass order, a pass's query batches one pass ahead of its units, so
query-side work overlaps the previous pass's scoring.

A task is attempted ``1 + cluster.max_retries`` times when its worker raises or dies. A
:class:`~attribution.errors.UserError` (bad data, a bad setting) is not a worker fault: it
fails the job at once with its own message, also from inside a Ray worker.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attribution.errors import UserError, raise_user_error_of
from attribution.prefilter.candidates import Candidates
from attribution.scoring.inputs import ScoreInputs, StageIdentity
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.tasks import QueryPlan, ScoreTasks, pass_batches


@dataclass(frozen=True, order=True)
class QueryTask:
    """Compute query batch ``index``'s factors."""

    index: int


Task = QueryTask | WorkUnit


class Schedule:
    """The tasks still to run, and which are ready.

    ``release(group)`` is called once every query batch of pass ``group`` is written; it
    returns the pass's units still to score (the driver reads the batches' headers there).
    """

    def __init__(self, num_batches: int, per_pass: int, written: set[int], release: Callable[[int], list[WorkUnit]]) -> None:
        self.num_batches = num_batches
        self.per_pass = per_pass
        self.release = release
        self.num_groups = -(-num_batches // per_pass)
        self._waiting = {g: set(pass_batches(g, per_pass, num_batches)) - written for g in range(self.num_groups)}
        self._ready: list[tuple[tuple[int, int, int], Task]] = []
        self.failed_groups: set[int] = set()
        for group, waiting in self._waiting.items():
            for index in sorted(waiting):
                heapq.heappush(self._ready, ((group - 1, 0, index), QueryTask(index)))
            if not waiting:
                self._release(group)

    def _release(self, group: int) -> None:
        for unit in self.release(group):
            heapq.heappush(self._ready, ((group, 1, unit.shard_index), unit))

    def next(self) -> Task | None:
        return heapq.heappop(self._ready)[1] if self._ready else None

    def batches(self, group: int) -> range:
        return pass_batches(group, self.per_pass, self.num_batches)

    def finished(self, task: Task) -> None:
        if isinstance(task, QueryTask):
            group = task.index // self.per_pass
            self._waiting[group].discard(task.index)
            if not self._waiting[group] and group not in self.failed_groups:
                self._release(group)

    def failed(self, task: Task) -> None:
        """A query batch that keeps failing leaves its pass unscored."""
        if isinstance(task, QueryTask):
            self.failed_groups.add(task.index // self.per_pass)


def _run(tasks: ScoreTasks, task: Task, store: MarkerStore, schedule: Schedule) -> None:
    if isinstance(task, QueryTask):
        tasks.compute_query_batch(store, task.index)
    else:
        tasks.score_unit(store, task, schedule.batches(task.group))


Failures = dict[Task, str]


class LocalExecutor:
    """Every task in this process, one after the other."""

    def __init__(self, inputs: ScoreInputs, output_dir: Path, candidates: Candidates | None,
                 product_workers: dict[str, list] | None = None) -> None:
        self.tasks = ScoreTasks(inputs, output_dir, candidates, product_workers=product_workers)
        self.max_retries = inputs.cluster.max_retries

    def identity(self) -> StageIdentity:
        return self.tasks.identity()

    def query_plan(self) -> QueryPlan:
        return self.tasks.query_plan()

    def run(self, schedule: Schedule, store: MarkerStore, on_done: Callable[[Task], None]) -> Failures:
        failures: Failures = {}
        while (task := schedule.next()) is not None:
            for attempt in range(1 + self.max_retries):
                try:
                    _run(self.tasks, task, store, schedule)
                except UserError:
                    raise
                except Exception as error:  # a worker fault: retried, then recorded
                    failures[task] = f"attempt {attempt + 1}: {type(error).__name__}: {error}"
                else:
                    failures.pop(task, None)
                    schedule.finished(task)
                    on_done(task)
                    break
            else:
                schedule.failed(task)
        return failures

    def worker_records(self) -> list[dict]:
        return []

    def lost_workers(self) -> list[dict]:
        return []

    def close(self) -> None:
        """Nothing to release: the tasks ran in this process."""


class RayExecutor:
    """A pool of ``cluster.num_workers`` actors, each loading the stages once.

    A worker that dies (or whose node is lost) is replaced by a fresh actor (calls to a restarting
    actor fail at once, which would spend a task's retries in milliseconds) and its task goes back
    into the queue, for the next worker that is free. The replacement takes tasks only once Ray has
    placed and started it: on a cluster that lost a node there may be no room for it until the
    cluster grows again, and a task handed to it would wait as long. A replacement that cannot
    start leaves the pool smaller; when no worker is left, the tasks not yet done fail.
    """

    def __init__(self, inputs: ScoreInputs, output_dir: Path, candidates: Candidates | None,
                 product_workers: dict[str, list] | None = None) -> None:
        import ray

        from attribution.distributed.cluster import worker_environment
        from attribution.distributed.score_worker import ScoreWorker

        self._ray = ray
        cluster = inputs.cluster
        self.max_retries = cluster.max_retries
        options = {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker,
                   "runtime_env": {"env_vars": worker_environment()}}
        self._create = lambda: ScoreWorker.options(**options).remote(inputs, str(output_dir), candidates, product_workers)
        # Each worker's Ray node, asked first: the answer also says the worker has started.
        self._nodes: dict = {}
        self._tasks_done: Counter = Counter()
        self._lost: list = []
        self.workers = [self._start() for _ in range(cluster.num_workers)]
        self._records: list[dict] = []

    def _start(self):
        worker = self._create()
        self._nodes[worker] = worker.node.remote()
        return worker

    def _node(self, worker) -> str | None:
        try:
            return self._ray.get(self._nodes[worker])
        except self._ray.exceptions.RayError:  # died before it said
            return None

    def _first(self, method: str):
        try:
            return self._ray.get(getattr(self.workers[0], method).remote())
        except self._ray.exceptions.RayError as error:
            raise_user_error_of(error)
            raise

    def identity(self) -> StageIdentity:
        return self._first("identity")

    def query_plan(self) -> QueryPlan:
        return self._first("query_plan")

    def run(self, schedule: Schedule, store: MarkerStore, on_done: Callable[[Task], None]) -> Failures:
        ray = self._ray
        attempts: Counter[Task] = Counter()
        failures: Failures = {}
        retry: deque[Task] = deque()
        idle = list(self.workers)
        running: dict = {}
        starting: dict = {}  # a replacement's node call -> the replacement

        def call(worker, task: Task):
            if isinstance(task, QueryTask):
                return worker.compute_query_batch.remote(store, task.index)
            return worker.score_unit.remote(store, task, list(schedule.batches(task.group)))

        def next_task() -> Task | None:
            return retry.popleft() if retry else schedule.next()

        while True:
            while idle and (task := next_task()) is not None:
                worker = idle.pop()
                running[call(worker, task)] = (task, worker)
            if not running and (idle or not starting):
                break  # every task done (replacements still waiting for room are not needed), or no worker left
            (done,), _ = ray.wait([*running, *starting], num_returns=1)
            if done in starting:
                worker = starting.pop(done)
                if self._node(worker) is None:
                    self._lose(worker)
                else:
                    idle.append(worker)
                continue
            task, worker = running.pop(done)
            try:
                ray.get(done)
            except ray.exceptions.RayError as error:
                raise_user_error_of(error)
                attempts[task] += 1
                if attempts[task] <= self.max_retries:
                    retry.append(task)
                else:
                    failures[task] = f"attempt {attempts[task]}: {type(error).__name__}: {error}"
                    schedule.failed(task)
                if isinstance(error, ray.exceptions.RayActorError):
                    self._lose(worker)
                    replacement = self._start()
                    self.workers.append(replacement)
                    starting[self._nodes[replacement]] = replacement
                    continue
            else:
                self._tasks_done[worker] += 1
                schedule.finished(task)
                on_done(task)
            idle.append(worker)
        while (task := next_task()) is not None:
            failures[task] = "no worker left: every worker of the pool died and no replacement could start"
            schedule.failed(task)
        self._records = self._describe([worker for worker in self.workers if worker not in starting.values()])
        return failures

    def _lose(self, worker) -> None:
        self._ray.kill(worker)
        self.workers.remove(worker)
        self._lost.append(worker)

    def _describe(self, started: list) -> list[dict]:
        """Each started worker's node, tasks done and peak memory (one lost since its last task counts as lost)."""
        records = []
        for worker in started:
            try:
                peak = self._ray.get(worker.peak_memory_mib.remote())
            except self._ray.exceptions.RayActorError:
                self._lose(worker)
                continue
            records.append({"node": self._node(worker), "tasks": self._tasks_done[worker], "peak_memory_mib": round(peak, 1)})
        return records

    def worker_records(self) -> list[dict]:
        return self._records

    def lost_workers(self) -> list[dict]:
        return [{"node": self._node(worker), "tasks": self._tasks_done[worker]} for worker in self._lost]

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
