"""Progress bars: drawn by the process that owns the terminal, one bar per stage.

In this process a stage is a plain tqdm bar. Inside a Ray worker nothing is drawn: the worker
counts its items into a small actor, and the driver, inside :func:`worker_progress`, draws one
bar per stage from those counts, on the same terminal as its own lines. (A bar drawn in a
worker would be re-printed by Ray on the driver, prefixed and out of step with the driver's.)
Each stage's total and time also go to the job log when it ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")
HUB_NAME = "attribution-progress"
# Seconds between a worker's updates, and between the driver's redraws.
SEND_EVERY = 0.5
DRAW_EVERY = 0.25

log = logging.getLogger(__name__)

# Who is told when a stage of work begins (the scale benchmark's memory sampler); nobody by default.
_stage_listeners: list[Callable[[str], None]] = []


def begin_stage(name: str) -> None:
    """Tell the stage listeners that stage ``name`` begins here (free when there are none)."""
    for listener in _stage_listeners:
        listener(name)


@contextmanager
def stage_listener(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(name)`` at every :func:`begin_stage` inside the block."""
    _stage_listeners.append(listener)
    try:
        yield
    finally:
        _stage_listeners.remove(listener)


def progress_bar(items: Iterable[Item], description: str, unit: str, enabled: bool = True) -> Iterator[Item]:
    """Iterate ``items``, counting them on a bar: here, or on the driver's when in a Ray worker."""
    if not enabled:
        yield from items
        return
    hub = _driver_hub()
    if hub is not None:
        yield from _counted_to(hub, items, description, unit)
        return
    if _in_ray_worker():
        yield from items
        return
    started = time.perf_counter()
    bar = tqdm(items, desc=description, unit=unit, file=sys.stderr)
    yield from bar
    _log_stage(description, bar.n, unit, time.perf_counter() - started)


@contextmanager
def worker_progress(enabled: bool = True) -> Iterator[None]:
    """On the driver, while Ray workers run: draw the stages they count as bars here."""
    if not enabled:
        yield
        return
    import ray

    hub = ray.remote(num_cpus=0)(_Hub).options(name=HUB_NAME).remote()
    stop = threading.Event()
    drawer = threading.Thread(target=_draw, args=(hub, stop), daemon=True)
    drawer.start()
    try:
        yield
    finally:
        stop.set()
        drawer.join()
        _close(hub)


class _Hub:
    """Per stage: items counted by every worker, and how many workers are still counting."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    def add(self, stage: str, unit: str, count: int, finished: bool) -> None:
        entry = self.stages.setdefault(stage, {"unit": unit, "count": 0, "open": 0})
        entry["count"] += count
        if finished:
            entry["open"] -= 1

    def begin(self, stage: str, unit: str) -> None:
        entry = self.stages.setdefault(stage, {"unit": unit, "count": 0, "open": 0})
        entry["open"] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.stages

    def close(self) -> None:
        import ray

        ray.actor.exit_actor()


def _close(hub: Any) -> None:
    """Let the hub exit by itself (a killed actor can take Ray's logging down with it), and
    wait until its name is free for the next stage of this driver."""
    import ray

    hub.close.remote()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ray.get_actor(HUB_NAME)
        except ValueError:
            return
        time.sleep(0.05)


def _counted_to(hub: Any, items: Iterable[Item], stage: str, unit: str) -> Iterator[Item]:
    import ray

    ray.get(hub.begin.remote(stage, unit))
    pending, sent = 0, time.perf_counter()
    try:
        for item in items:
            yield item
            pending += 1
            if time.perf_counter() - sent >= SEND_EVERY:
                hub.add.remote(stage, unit, pending, False)
                pending, sent = 0, time.perf_counter()
    finally:
        # Waited for, so the driver's last redraw sees every item.
        ray.get(hub.add.remote(stage, unit, pending, True))


def _draw(hub: Any, stop: threading.Event) -> None:
    """The driver's side: one bar per stage, closed (and logged) when every worker has finished it."""
    import ray

    bars: dict[str, tqdm] = {}
    closed: set[str] = set()
    while True:
        stopping = stop.wait(DRAW_EVERY)
        try:
            stages = ray.get(hub.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the hub goes with the cluster; drawing must never fail a job
            stages = {}
        for name, entry in stages.items():
            if name in closed:
                continue
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(desc=name, unit=entry["unit"], file=sys.stderr)
            bar.update(entry["count"] - bar.n)
            if entry["open"] <= 0 or stopping:
                bar.close()
                closed.add(name)
                _log_stage(name, bar.n, entry["unit"], bar.format_dict["elapsed"])
        if stopping:
            return


def _log_stage(stage: str, count: int, unit: str, seconds: float) -> None:
    log.info("%s: %d %s in %.1f s", stage, count, unit, seconds)


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _driver_hub() -> Any | None:
    """The driver's hub, when this is a Ray worker of a driver inside :func:`worker_progress`."""
    if not _in_ray_worker():
        return None
    import ray

    try:
        return ray.get_actor(HUB_NAME)
    except ValueError:
        return None
