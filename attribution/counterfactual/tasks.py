"""Run the retraining tasks that are not finished: in this process, or as Ray tasks over the cluster.

A finished task (its model kept and its measurements written) is read back, not run again, so a
rerun after a crash trains only what is missing. On Ray every (subset, seed) is one task of
``cluster.cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs), at most ``cluster.num_workers``
in flight; a worker that dies is retried up to ``cluster.max_retries`` times (its half-written
folder is never renamed into place, so the retry starts clean).
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from attribution.counterfactual.retrain import RetrainTask, TaskOutcome, retrain_and_measure
from attribution.settings import ClusterSettings


class RetrainFailure(RuntimeError):
    """A retraining task that failed on every attempt; the models finished before it are kept."""


def run_retraining(tasks: Sequence[RetrainTask], cluster: ClusterSettings, progress: bool) -> list[TaskOutcome]:
    """Every task's outcome, in task order."""
    outcomes: dict[int, TaskOutcome] = {}
    pending = []
    for task in tasks:
        if task.finished():
            outcomes[task.position] = retrain_and_measure(task)
        else:
            pending.append(task)
    bar = tqdm(total=len(pending), desc="retraining on subsets", unit="model", disable=not progress or not pending)
    if cluster.uses_ray:
        outcomes.update(_on_ray(pending, cluster, bar))
    else:
        for task in pending:
            outcomes[task.position] = retrain_and_measure(task)
            bar.update()
    bar.close()
    return [outcomes[task.position] for task in tasks]


def _remote_retrain(task: RetrainTask) -> TaskOutcome:
    from attribution.distributed.cluster import prepare_worker_process

    prepare_worker_process()
    return retrain_and_measure(task)


def _on_ray(tasks: Sequence[RetrainTask], cluster: ClusterSettings, bar: tqdm) -> dict[int, TaskOutcome]:
    """Keep ``num_workers`` tasks in flight until all are done (the caller holds the Ray session)."""
    import ray

    remote = ray.remote(_remote_retrain).options(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker,
                                                 max_retries=cluster.max_retries)
    queue = iter(tasks)
    running: dict[ray.ObjectRef, RetrainTask] = {}
    outcomes: dict[int, TaskOutcome] = {}

    def submit() -> None:
        task = next(queue, None)
        if task is not None:
            running[remote.remote(task)] = task

    for _ in range(cluster.num_workers):
        submit()
    while running:
        (ready,), _ = ray.wait(list(running), num_returns=1)
        task = running.pop(ready)
        try:
            outcomes[task.position] = ray.get(ready)
        except ray.exceptions.RayError as error:
            for other in running:
                ray.cancel(other)
            raise RetrainFailure(f"retraining subset {task.subset.index} with seed {task.seed} failed on every attempt "
                                 f"({len(outcomes)} models finished this run are kept; rerun to resume): {error}") from error
        bar.update()
        submit()
    return outcomes
