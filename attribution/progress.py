"""Progress bars that read well in a terminal and from inside Ray workers.

A plain tqdm bar in a Ray actor prints a new log line per refresh on the driver; Ray's own
``tqdm_ray`` sends the bar's state to the driver, which draws it in place.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def progress_bar(items: Iterable[Item], description: str, unit: str, enabled: bool = True) -> Iterator[Item]:
    if not enabled:
        return iter(items)
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return iter(ray_tqdm(items, desc=description, unit=unit))
    return iter(tqdm(items, desc=description, unit=unit))
