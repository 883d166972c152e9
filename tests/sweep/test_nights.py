"""Nights of a sweep equal one run over all shards; reruns add nothing; rewritten shards are replaced."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from attribution.data.corpus import DataError
from tests.sweep.conftest import shard_rows, write_shard
from tests.sweep.helpers import assert_same_table, current, reference, snapshot, sweep


def test_two_nights_give_the_one_run_top_k_and_a_rerun_is_a_no_op(world):
    world.arrive(0, 1)
    first = sweep(world, "2025-01-01")
    assert (len(first.plan.new), first.fresh) == (2, True)
    world.arrive(2, 3)
    second = sweep(world, "2025-01-02")
    assert (second.plan.new, second.plan.unchanged) == ([str(world.corpus / "shard-2.parquet"), str(world.corpus / "shard-3.parquet")],
                                                        [str(world.corpus / "shard-0.parquet"), str(world.corpus / "shard-1.parquet")])
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)
    assert {row["sweep_date"] for row in rows} == {"2025-01-01", "2025-01-02"}
    # The dated dataset: each night's rows are the top-k over that night's shards only.
    nights = pq.read_table(world.output / "scores").to_pylist()
    assert {str(row["sweep_date"]) for row in nights} == {"2025-01-01", "2025-01-02"}
    assert {row["shard"].rsplit("/", 1)[1] for row in nights if str(row["sweep_date"]) == "2025-01-01"} <= {
        "shard-0.parquet", "shard-1.parquet"}
    assert len(nights) == first.rows_added + second.rows_added

    before = snapshot(world.output)
    again = sweep(world, "2025-01-02")
    assert again.noop and again.rows_added == 0
    assert any("nothing to sweep" in message for message in again.messages)
    assert snapshot(world.output) == before
    # Another night with nothing new, and a touched but unchanged shard: still nothing.
    (world.corpus / "shard-0.parquet").touch()
    assert sweep(world, "2025-01-03").noop
    assert pq.read_table(world.output / "scores").num_rows == len(nights)


def test_a_rewritten_shard_replaces_its_rows(world):
    world.arrive(0, 1)
    sweep(world, "2025-01-01")
    world.arrive(2)
    sweep(world, "2025-01-02")
    old_ids = {row["id"] for row in shard_rows(1)}
    write_shard(world.corpus, 1, shard_rows(1, prefix="new")[:4])
    night = sweep(world, "2025-01-03")
    assert [p.rsplit("/", 1)[1] for p in night.plan.changed] == ["shard-1.parquet"]
    # Shard 0 was swept with shard 1 (one top-k over both), so it is re-scored with it.
    assert [p.rsplit("/", 1)[1] for p in night.plan.regrouped] == ["shard-0.parquet"]
    assert len(night.plan.retired) == 1
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)
    nights = pq.read_table(world.output / "scores").to_pylist()
    assert not old_ids & {row["doc_id"] for row in nights}
    assert {str(row["sweep_date"]) for row in nights} == {"2025-01-02", "2025-01-03"}  # night 1's group was replaced
    assert not (world.output / "scores" / "sweep_date=2025-01-01").exists()
    state = json.loads((world.output / "sweep_state.json").read_text())
    assert [entry["sweep_date"] for entry in state["retired"]] == ["2025-01-01"]
    assert state["shards"][str(world.corpus / "shard-1.parquet")]["swept_on"] == "2025-01-03"
    assert state["watermark"]["sweep_date"] == "2025-01-03"


def test_missing_shards_are_kept_and_said_or_dropped(world):
    world.arrive(0)
    sweep(world, "2025-01-01")
    world.arrive(1, 2)
    sweep(world, "2025-01-02")
    kept_rows, _ = current(world)
    (world.corpus / "shard-0.parquet").unlink()
    kept = sweep(world, "2025-01-03")
    assert kept.noop and any("no longer under" in m and "shard-0.parquet" in m for m in kept.messages)
    assert current(world)[0] == kept_rows
    dropped = sweep(world, "2025-01-03", drop_missing_shards=True)
    assert any("removed" in m and "shard-0.parquet" in m for m in dropped.messages)
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)


def test_a_document_id_in_two_shards_is_an_error_naming_both(world):
    world.arrive(0)
    sweep(world, "2025-01-01")
    rows, _ = current(world)
    top = next(row for row in rows if row["rank"] == 1 and row["direction"] == "positive")
    text = next(doc["text"] for doc in shard_rows(0) if doc["id"] == top["doc_id"])
    write_shard(world.corpus, 5, [{"id": top["doc_id"], "text": text}])
    with pytest.raises(DataError, match=r"shard-0\.parquet.*shard-5\.parquet"):
        sweep(world, "2025-01-02")
    assert not (world.output / "scores" / "sweep_date=2025-01-02").exists()  # nothing committed
