"""Where a score run's tasks run, chosen from ``cluster``: this process, a Ray pool, or sharded Ray workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attribution.prefilter.candidates import Candidates
from attribution.scoring.execution import LocalExecutor, RayExecutor
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.sharded_execution import ShardedExecutor

Executor = LocalExecutor | RayExecutor | ShardedExecutor


@contextmanager
def executor(inputs: ScoreInputs, output_dir: Path, candidates: Candidates | None) -> Iterator[Executor]:
    """This process (``cluster.num_workers=0``), a Ray pool, or Ray workers sharing the sharded models
    (``cluster.sharding``), for the length of a run."""
    if not inputs.cluster.uses_ray:
        yield LocalExecutor(inputs, output_dir, candidates)
        return
    from attribution.distributed.cluster import ray_session

    with ray_session(inputs.cluster):
        pool = (ShardedExecutor if inputs.cluster.sharded else RayExecutor)(inputs, output_dir, candidates)
        try:
            yield pool
        finally:
            pool.close()
