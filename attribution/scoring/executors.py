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
    (``cluster.sharding``), for the length of a run; with ``refine.workers``, the refinement's product
    workers beside them (Ray is started for those even when the tasks run in this process)."""
    product_workers = inputs.refine.workers if inputs.refine.enabled else 0
    if not inputs.cluster.uses_ray and not product_workers:
        yield LocalExecutor(inputs, output_dir, candidates)
        return
    from attribution.distributed.cluster import ray_session
    from attribution.refine.product_pool import start_product_workers, stop_product_workers

    stages = ["finetuned_model", "model"] if inputs.finetune.enabled else ["model"]
    with ray_session(inputs.cluster, extra_workers=product_workers * len(stages)):
        products = start_product_workers(inputs.cluster, product_workers, stages) if product_workers else {}
        if not inputs.cluster.uses_ray:
            pool: Executor = LocalExecutor(inputs, output_dir, candidates, products)
        elif inputs.cluster.sharded:
            pool = ShardedExecutor(inputs, output_dir, candidates)
        else:
            pool = RayExecutor(inputs, output_dir, candidates, products)
        try:
            yield pool
        finally:
            pool.close()
            stop_product_workers(products)
