"""Start or join Ray, with every worker process limited to the configured threads."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from attribution.settings import ClusterSettings


def worker_environment() -> dict[str, str]:
    """What workers inherit from the driver: the thread limit (extra torch threads on shared
    cores slow CPU workers down several times) and the ``ATTRIBUTION_*`` settings."""
    forwarded = {name: value for name, value in os.environ.items() if name.startswith("ATTRIBUTION_")}
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **forwarded}


def prepare_worker_process() -> None:
    """In a worker's constructor: the driver's thread limit, and no per-file weight-loading bars
    (each would print as its own line on the driver)."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    transformers_logging.disable_progress_bar()


@contextmanager
def ray_session(cluster: ClusterSettings) -> Iterator[None]:
    """Join ``cluster.address`` (``auto`` or an address), the cluster of a ``ray job submit``
    (``RAY_ADDRESS``), or start a local Ray in this process; shut down only what was started here."""
    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": worker_environment()}
    if cluster.address is not None:
        ray.init(address=cluster.address, runtime_env=runtime_env)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        cpus = max(os.cpu_count() or 1, int(cluster.num_workers * cluster.cpus_per_worker))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def peak_memory_mib() -> float:
    """This process's peak resident memory (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    """A TCP port free on this node now, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
