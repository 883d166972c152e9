"""The Ray pool's bookkeeping when workers are lost, against a scripted stand-in for Ray: which
worker gets which task, and when a replacement may take one (a real cluster that lost a node is
tests/distributed/test_multinode.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from attribution.distributed import score_worker
from attribution.scoring.execution import RayExecutor, Schedule
from attribution.scoring.markers import WorkUnit
from attribution.settings import ClusterSettings

UNITS = [WorkUnit(0, index, f"shard-{index}") for index in range(4)]


class Call:
    """An object ref: finished with a value or an error, or never finishing."""

    def __init__(self, value: object = None, error: Exception | None = None, finishes: bool = True) -> None:
        self.value, self.error, self.finishes = value, error, finishes


class Worker:
    """A scripted actor: its node call, and the number of tasks it does before it dies (None: never)."""

    def __init__(self, name: str, node: Call, dies_after: int | None = None) -> None:
        self.name, self.node_call, self.dies_after = name, node, dies_after
        self.done: list[WorkUnit] = []

    def __getattr__(self, method: str):
        return SimpleNamespace(remote=lambda *args: self._call(method, *args))

    def _call(self, method: str, *args) -> Call:
        if method == "node":
            return self.node_call
        if method == "peak_memory_mib":
            return Call(100.0)
        assert method == "score_unit", method
        if self.dies_after is not None and len(self.done) >= self.dies_after:
            return Call(error=ray.exceptions.ActorDiedError())
        self.done.append(args[1])
        return Call()


class FakeRay:
    """``ray.get``, ``ray.wait`` and ``ray.kill`` over scripted calls; waiting on a call that never
    finishes fails the test (the real pool would hang there)."""

    def get(self, call: Call) -> object:
        assert call.finishes, "the pool waits for a call that never finishes"
        if call.error is not None:
            raise call.error
        return call.value

    def wait(self, calls: list[Call], num_returns: int) -> tuple[list[Call], list[Call]]:
        finished = [call for call in calls if call.finishes]
        assert finished, "the pool waits for calls that never finish"
        return finished[:1], [call for call in calls if call is not finished[0]]

    def kill(self, worker: Worker) -> None:
        worker.killed = True


def pool(monkeypatch, workers: list[Worker], num_workers: int = 2, max_retries: int = 2) -> RayExecutor:
    """A pool whose actors are ``workers``, in order of creation (replacements included)."""
    created = iter(workers)
    actor_class = SimpleNamespace(options=lambda **_: SimpleNamespace(remote=lambda *_: next(created)))
    monkeypatch.setattr(score_worker, "ScoreWorker", actor_class)
    fake = FakeRay()
    for name in ("get", "wait", "kill"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    inputs = SimpleNamespace(cluster=ClusterSettings(num_workers=num_workers, max_retries=max_retries))
    return RayExecutor(inputs, None, None)


def schedule() -> Schedule:
    """One pass whose query batch is already written: the four units are ready at once."""
    return Schedule(1, 1, {0}, lambda group: list(UNITS))


def test_a_lost_node_leaves_its_unit_to_the_survivor_while_the_replacement_has_no_room(monkeypatch):
    survivor = Worker("a", Call("node-a"))
    lost = Worker("b", Call("node-b"), dies_after=0)
    waiting = Worker("c", Call(finishes=False))  # Ray has no room to place it
    executor = pool(monkeypatch, [survivor, lost, waiting])
    failures = executor.run(schedule(), None, lambda task: None)
    assert failures == {}
    assert sorted(survivor.done) == UNITS and waiting.done == []
    assert executor.worker_records() == [{"node": "node-a", "tasks": 4, "peak_memory_mib": 100.0}]
    assert executor.lost_workers() == [{"node": "node-b", "tasks": 0}]


def test_the_pool_waits_for_a_replacement_when_no_worker_is_left(monkeypatch):
    lost = Worker("a", Call("node-a"), dies_after=1)
    replacement = Worker("b", Call("node-b"))
    executor = pool(monkeypatch, [lost, replacement], num_workers=1)
    assert executor.run(schedule(), None, lambda task: None) == {}
    assert lost.done == UNITS[:1] and replacement.done == UNITS[1:]
    assert executor.worker_records() == [{"node": "node-b", "tasks": 3, "peak_memory_mib": 100.0}]
    assert executor.lost_workers() == [{"node": "node-a", "tasks": 1}]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_with_no_worker_left_the_tasks_not_done_fail(monkeypatch, max_retries):
    first = Worker("a", Call("node-a"), dies_after=1)
    second = Worker("b", Call("node-b"), dies_after=0)
    unable = [Worker(name, Call(error=ray.exceptions.ActorDiedError())) for name in "cd"]  # die while starting
    executor = pool(monkeypatch, [first, second, *unable], max_retries=max_retries)
    failures = executor.run(schedule(), None, lambda task: None)
    assert set(failures) == set(UNITS) - set(first.done) and len(first.done) == 1
    expected = {"no worker left"} if max_retries else {"no worker left", "ActorDiedError"}
    assert {"no worker left" if "no worker left" in error else "ActorDiedError" for error in failures.values()} == expected
    assert executor.worker_records() == [] and len(executor.lost_workers()) == 4
