"""Fixtures of the Ray tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module, started as jobs start theirs: on loopback, token-authenticated."""
    import ray

    from attribution.distributed.cluster import start_local_ray
    from attribution.settings import ClusterSettings

    start_local_ray(ClusterSettings(), num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
