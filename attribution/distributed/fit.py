"""Factor fitting on Ray: one actor per worker, joined in a torch.distributed process group.

Each worker fits on its share of the sample; covariance and eigenvalue sums are all-reduced
(gloo on CPU, nccl on GPU), eigendecompositions are spread over the workers by module, and
the driver, the one writer, receives rank 0's factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch.distributed as dist

from attribution.curvature.store import FactorSet
from attribution.data.corpus import Skip
from attribution.distributed.cluster import GroupMember, TorchCollective, peak_memory_mib, ray_session, start_group
from attribution.progress import worker_progress
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings
from attribution.store_fit import fit_store


@dataclass
class WorkerFit:
    """What one worker sends back: the factors (rank 0 only), its skips, its Ray node and its footprint."""

    factors: FactorSet | None
    skips: list[Skip]
    node: str
    parameters_held: int
    peak_memory_mib: float


@ray.remote
class FitWorker(GroupMember):
    def fit(
        self,
        rank: int,
        world_size: int,
        address: str,
        port: int,
        model_settings: ModelSettings,
        data_settings: DataSettings,
        factor_settings: FactorSettings,
        sharding: str,
    ) -> WorkerFit:
        self.join_group(rank, world_size, address, port, model_settings.device)
        try:
            fit = fit_store(model_settings, data_settings, factor_settings, TorchCollective(),
                            progress=rank == 0, sharding=sharding)
        finally:
            dist.destroy_process_group()
        peak, node = peak_memory_mib(), ray.get_runtime_context().get_node_id()
        if rank != 0:
            return WorkerFit(None, fit.skips, node, fit.parameters_held, peak)
        on_cpu = {name: f.to("cpu", f.corrected_eigenvalues.dtype) for name, f in fit.factors.modules.items()}
        return WorkerFit(FactorSet(fit.factors.manifest, on_cpu), fit.skips, node, fit.parameters_held, peak)


def fit_on_ray(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    cluster: ClusterSettings,
) -> list[WorkerFit]:
    """Every worker's part, by rank; rank 0's holds the factors."""
    with ray_session(cluster):
        options = {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker}
        workers = [FitWorker.options(**options).remote() for _ in range(cluster.num_workers)]
        try:
            address, port = start_group(workers, cluster.listen)
            with worker_progress():
                results = ray.get([
                    worker.fit.remote(rank, len(workers), address, port, model_settings, data_settings, factor_settings,
                                      cluster.sharding)
                    for rank, worker in enumerate(workers)
                ])
        finally:
            for worker in workers:
                ray.kill(worker)
    return results
