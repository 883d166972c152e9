"""Gauss-Newton products over a refinement sample split between Ray workers (``refine.workers``).

The sample's Gauss-Newton matrix is a sum over its sequences, so with the batches dealt out to K
workers (batch ``b`` to worker ``b mod K``, which balances their lengths)

    G V = (1/N) sum_k S_k V,        S_k V = sum_{n in part k} sum_t J_{n,t}^T H_{n,t} J_{n,t} V,

each worker computing its ``S_k V`` (:meth:`~attribution.curvature.gauss_newton.GaussNewton.total`) on
its own copy of the model and keeping the graphs of its own part (``refine.cached_sequences`` each).
The solver stays where the query batch is solved; per product it sends the (Q, P) vectors through
Ray's object store and adds the K partial sums as they arrive.

A worker reads its part of the sample itself, when a product first reaches it, from a
:class:`ProductSource`: after a crash Ray restarts it (``cluster.max_retries`` times) and retries the
product, which reads the part again, so a lost worker costs time, not the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from attribution.curvature.gauss_newton import GaussNewton
from attribution.distributed.cluster import peak_memory_mib, prepare_worker_process, worker_environment
from attribution.errors import raise_user_error_of
from attribution.refine.sample import sample_batches
from attribution.settings import ClusterSettings, ModelSettings, SettingsError, resolve_device, torch_dtype


@dataclass(frozen=True)
class ProductSource:
    """What a product worker loads: one stage's model (checked by fingerprint, tracking ``modules`` in the
    solver's order) and the refinement sample it is split from."""

    model_path: str
    model: ModelSettings
    fingerprint: str
    modules: tuple[str, ...]
    data_path: str
    max_length: int
    batch_size: int
    max_sequences: int | None
    cached_sequences: int | None
    key: str


@ray.remote
class ProductWorker:
    """Holds a stage's model and one part of its refinement sample; answers ``S_k V``."""

    def __init__(self) -> None:
        prepare_worker_process()
        self._loaded: tuple[ProductSource, int, int] | None = None
        self._operator: GaussNewton | None = None

    def total(self, source: ProductSource, part: int, parts: int, vectors: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``S_k V`` for part ``part`` of ``parts`` (on the CPU, for the object store) and its sequences."""
        if self._loaded != (source, part, parts):
            self._operator = None
            self._operator = _part_operator(source, part, parts)
            self._loaded = (source, part, parts)
        assert self._operator is not None
        return self._operator.total(vectors).cpu(), self._operator.num_sequences

    def peak_memory_mib(self) -> float:
        return peak_memory_mib()


def _part_operator(source: ProductSource, part: int, parts: int) -> GaussNewton:
    from attribution.distributed.sharded_load import load_worker_model

    loaded, tracked = load_worker_model(source.model_path, source.model.trust_remote_code, torch_dtype(source.model.dtype),
                                        resolve_device(source.model.device), "none", source.model.tracked_modules)
    if loaded.fingerprint != source.fingerprint:
        raise SettingsError(f"model {source.model_path} changed during the run: fingerprint {loaded.fingerprint}, "
                            f"the run's {source.fingerprint}")
    by_name = {module.name: module for module in tracked}
    batches = sample_batches(loaded.tokenizer, source.data_path, source.max_length, source.batch_size, source.max_sequences,
                             lambda skip: None, source.key)
    return GaussNewton(loaded.model, [by_name[name] for name in source.modules], batches[part::parts],
                       cached_sequences=source.cached_sequences)


class RemoteGaussNewton:
    """``V -> G V`` on (Q, P) vectors, the sample's ``num_batches`` batches split over ``workers``."""

    def __init__(self, workers: list, source: ProductSource, num_batches: int, num_sequences: int, size: int,
                 device: torch.device) -> None:
        self.workers = workers[:max(1, min(len(workers), num_batches))]
        self.source = source
        self.num_sequences = num_sequences
        self.size = size
        self.device = device

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        shared = ray.put(vectors.detach().cpu())
        parts = len(self.workers)
        pending = [worker.total.remote(self.source, part, parts, shared) for part, worker in enumerate(self.workers)]
        result: torch.Tensor | None = None
        sequences = 0
        while pending:
            [done], pending = ray.wait(pending, num_returns=1)
            try:
                partial, count = ray.get(done)
            except ray.exceptions.RayError as error:
                raise_user_error_of(error)
                raise
            result = partial.to(self.device) if result is None else result.add_(partial.to(self.device))
            sequences += count
        if sequences != self.num_sequences:
            raise SettingsError(f"{self.source.key}={self.source.data_path} changed during the run: the refinement workers "
                                f"read {sequences} sequences, the run {self.num_sequences}")
        assert result is not None
        return result.div_(sequences)


def start_product_workers(cluster: ClusterSettings, workers: int, stages: list[str]) -> dict[str, list]:
    """``workers`` product workers per refined stage, restarted (and their product retried) after a crash up to
    ``cluster.max_retries`` times; each takes a worker's resources (``cluster.cpus_per_worker``, ``gpus_per_worker``).

    A Ray cluster without room for them beside ``cluster.num_workers`` is refused in one line: the first
    product would otherwise wait for them forever."""
    needed = cluster.num_workers + workers * len(stages)
    available = ray.cluster_resources()
    for resource, each in (("CPU", cluster.cpus_per_worker), ("GPU", cluster.gpus_per_worker)):
        if each and available.get(resource, 0.0) < needed * each:
            raise SettingsError(
                f"refine.workers={workers}: the Ray cluster has {available.get(resource, 0.0):g} {resource}s, the run needs "
                f"{needed * each:g} (cluster.num_workers={cluster.num_workers} and refine.workers={workers} for each of "
                f"{len(stages)} refined stage(s), {each:g} each); lower them or add nodes")
    options = {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker,
               "max_restarts": cluster.max_retries, "max_task_retries": cluster.max_retries,
               "runtime_env": {"env_vars": worker_environment()}}
    return {stage: [ProductWorker.options(**options).remote() for _ in range(workers)] for stage in stages}


def stop_product_workers(pool: dict[str, list]) -> None:
    for workers in pool.values():
        for worker in workers:
            ray.kill(worker)
