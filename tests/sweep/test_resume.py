"""A crashed sweep resumes: finished scoring is reused, finished units are not scored again."""

from __future__ import annotations

import json

import pytest

from attribution.scoring.run import ShardFailure
from attribution.scoring.shards import ShardScorer
from attribution.sweep import workflow
from attribution.sweep.lock import LOCK_NAME
from tests.sweep.helpers import assert_same_table, current, reference, sweep


def test_a_crash_after_scoring_reuses_the_finished_run(world, monkeypatch):
    world.arrive(0, 1)
    sweep(world, "2025-01-01")
    world.arrive(2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while merging")

    with monkeypatch.context() as patch:
        patch.setattr(workflow, "merge_top", crash)
        with pytest.raises(KeyboardInterrupt):
            sweep(world, "2025-01-02")
    assert not (world.output / LOCK_NAME).exists()
    state = json.loads((world.output / "sweep_state.json").read_text())
    assert state["watermark"]["sweep_date"] == "2025-01-01"  # not committed

    calls = []
    monkeypatch.setattr(workflow, "run_score", lambda *a, **k: calls.append(a))
    resumed = sweep(world, "2025-01-02")  # resumed the next morning would file it under that date instead
    assert calls == [] and any("resumed" in m for m in resumed.messages)
    assert [p.rsplit("/", 1)[1] for p in resumed.plan.new] == ["shard-2.parquet"]
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)
    assert not (world.output / ".sweep" / "work").exists()  # cleaned up on commit
    assert sweep(world, "2025-01-02").noop


def test_a_failing_shard_commits_nothing_and_the_rerun_scores_only_what_is_left(world, monkeypatch):
    world.arrive(0, 1, 2)
    original = ShardScorer.run

    def flaky(self, unit, *args):
        if unit.shard.endswith("shard-1.parquet"):
            raise OSError("disk went away")
        return original(self, unit, *args)

    with monkeypatch.context() as patch:
        patch.setattr(ShardScorer, "run", flaky)
        with pytest.raises(ShardFailure, match="shard-1.parquet"):
            sweep(world, "2025-01-01")
    assert not (world.output / "sweep_state.json").exists() and not (world.output / "current").exists()

    night = sweep(world, "2025-01-01")
    state = json.loads((world.output / "sweep_state.json").read_text())
    score_record = json.loads((world.output / "runs" / f"{state['nights'][-1]['score_run']}.json").read_text())
    # Two query batches x three shards; the two shards that succeeded were resumed from their markers.
    assert score_record["counts"]["units"] == 6 and score_record["counts"]["units_resumed"] == 4
    assert len(night.plan.new) == 3
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)
