"""Progress of Ray workers reaches the driver as one bar per stage, with whole counts, and the log."""

from __future__ import annotations

import logging
import re

import pytest

from attribution.progress import progress_bar, worker_progress


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_a_stage_counted_in_this_process_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="attribution.progress"):
        assert sum(1 for _ in progress_bar(range(7), "local stage", "batch")) == 7
    assert re.search(r"^local stage: 7 batch in \d+\.\d s$", caplog.messages[-1])


# Console drawing from Ray workers (half a minute of Ray start-up): slow suite.
@pytest.mark.slow
def test_worker_stages_are_drawn_by_the_driver(ray_cluster, capsys, caplog):
    @ray_cluster.remote
    def work(count: int) -> int:
        total = 0
        for _ in progress_bar(range(count), "first stage", "batch"):
            total += 1
        for _ in progress_bar(range(count // 2), "second stage", "batch"):
            total += 1
        return total

    with caplog.at_level(logging.INFO, logger="attribution.progress"), worker_progress():
        assert ray_cluster.get(work.remote(41)) == 61
    with worker_progress():  # a second fit of the same driver gets its own hub
        assert ray_cluster.get(work.remote(2)) == 3
    drawn = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"first stage: 41batch \[", drawn) and re.search(r"second stage: 20batch \[", drawn)
    bars = [line for line in drawn.splitlines() if "stage:" in line]
    assert bars and not any("(pid=" in line or "41.0batch" in line for line in bars)
    messages = [m for m in caplog.messages if "stage:" in m]
    assert [m.split(" in ")[0] for m in messages][:2] == ["first stage: 41 batch", "second stage: 20 batch"]


def test_a_worker_outside_worker_progress_draws_nothing(ray_cluster, capsys):
    @ray_cluster.remote
    def work() -> int:
        return sum(1 for _ in progress_bar(range(5), "silent stage", "batch"))

    assert ray_cluster.get(work.remote()) == 5
    assert "silent stage" not in capsys.readouterr().err
