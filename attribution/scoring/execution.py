"""Run work units with retries: in this process, or on a pool of long-lived Ray workers.

Both report each finished unit to ``on_result`` (the driver writes its completion marker)
and return the units that failed on every attempt, with the last error. A unit is
attempted ``1 + max_retries`` times, whether its worker raised or died.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable, Sequence

from attribution.prefilter.candidates import Candidates
from attribution.scoring.markers import UnitResult, WorkUnit
from attribution.scoring.query_factors import QueryFactors
from attribution.scoring.shards import ShardScorer
from attribution.settings import ClusterSettings, DataSettings, ModelSettings, ScoreSettings

ResultHandler = Callable[[UnitResult], None]


def run_in_process(
    scorer: ShardScorer, units: Sequence[WorkUnit], max_retries: int, on_result: ResultHandler
) -> dict[WorkUnit, str]:
    failures: dict[WorkUnit, str] = {}
    for unit in units:
        for attempt in range(1 + max_retries):
            try:
                on_result(scorer.run(unit))
                failures.pop(unit, None)
                break
            except Exception as error:  # a failing shard is retried, then recorded, never fatal here
                failures[unit] = f"attempt {attempt + 1}: {type(error).__name__}: {error}"
    return failures


def tracked_names_pattern(names: Sequence[str]) -> str:
    """A ``model.tracked_modules`` regex that selects exactly these modules."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def run_on_ray(
    cluster: ClusterSettings,
    model: ModelSettings,
    tracked_names: Sequence[str],
    query_sets: Sequence[QueryFactors],
    data: DataSettings,
    score: ScoreSettings,
    candidates: Candidates | None,
    units: Sequence[WorkUnit],
    on_result: ResultHandler,
) -> tuple[dict[WorkUnit, str], list[float]]:
    """The failures, and the peak memory (MiB) of each worker alive at the end.

    A pool of ``cluster.num_workers`` actors, each loading the model and the query factors once.

    A worker that dies is replaced by a fresh actor (calls to a restarting actor fail at once,
    which would spend a unit's retries in milliseconds) and its unit goes back into the queue.
    """
    import ray

    from attribution.distributed.cluster import ray_session, worker_environment
    from attribution.distributed.score_worker import ScoreWorker

    with ray_session(cluster):
        factors = ray.put(list(query_sets))
        options = {
            "num_cpus": cluster.cpus_per_worker,
            "num_gpus": cluster.gpus_per_worker,
            "runtime_env": {"env_vars": worker_environment()},
        }
        pattern = tracked_names_pattern(tracked_names)

        def start_worker():
            return ScoreWorker.options(**options).remote(model, pattern, factors, data, score, candidates)

        idle = [start_worker() for _ in range(min(cluster.num_workers, len(units)))]
        attempts: Counter[WorkUnit] = Counter()
        failures: dict[WorkUnit, str] = {}
        queue = deque(units)
        running: dict = {}
        try:
            while queue or running:
                while queue and idle:
                    unit, worker = queue.popleft(), idle.pop()
                    running[worker.run.remote(unit)] = (unit, worker)
                (done,), _ = ray.wait(list(running), num_returns=1)
                unit, worker = running.pop(done)
                try:
                    result = ray.get(done)
                except ray.exceptions.RayError as error:
                    if isinstance(error, ray.exceptions.RayActorError):
                        ray.kill(worker)
                        worker = start_worker()
                    attempts[unit] += 1
                    if attempts[unit] <= cluster.max_retries:
                        queue.append(unit)
                    else:
                        failures[unit] = f"attempt {attempts[unit]}: {type(error).__name__}: {error}"
                else:
                    on_result(result)
                idle.append(worker)
            peaks = ray.get([worker.peak_memory_mib.remote() for worker in idle])
        finally:
            for worker in idle + [worker for _, worker in running.values()]:
                ray.kill(worker)
    return failures, peaks
