"""A change of model, factors, queries or score settings starts a fresh table and says so."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq

from attribution.fitting import run_fit
from attribution.settings import FactorSettings, ModelSettings
from tests.sweep.conftest import WORDS, shard_rows
from tests.sweep.helpers import assert_same_table, current, reference, sweep
from tests.tiny import save_tiny_lm


def fresh_message(summary) -> str:
    return next(m for m in summary.messages if "starting a fresh table" in m)


def test_a_new_model_starts_a_fresh_table_and_archives_the_old(world):
    world.arrive(0, 1)
    first = sweep(world, "2025-01-01")
    old_rows, _ = current(world)
    texts = [row["text"] for shard in range(6) for row in shard_rows(shard) + shard_rows(shard, prefix="new")]
    world.model = ModelSettings(path=str(save_tiny_lm(world.root / "model-2", texts + WORDS, seed=1)), device="cpu")
    world.arrive(2)
    second = sweep(world, "2025-01-02")
    assert second.fresh and second.epoch != first.epoch
    message = fresh_message(second)
    assert "model fingerprint" in message and "queries" not in message and "factors fingerprint" not in message
    assert len(second.plan.new) == 3  # every shard again, scored by the new model
    rows, tokens = current(world)
    expected, expected_tokens = reference(world)
    assert_same_table(rows, expected, tokens, expected_tokens)
    assert {row["sweep_date"] for row in rows} == {"2025-01-02"}
    archive = world.output / "archive" / first.epoch
    assert json.loads((archive / "sweep_state.json").read_text())["epoch"] == first.epoch
    assert pq.read_table(archive / "current" / "scores.parquet").to_pylist() == old_rows
    assert pq.read_table(archive / "scores").num_rows == first.rows_added
    assert pq.read_table(world.output / "scores").num_rows == second.rows_added


def test_refitted_factors_and_changed_settings_start_fresh_tables(world):
    world.arrive(0, 1)
    store = world.root / "factors"
    fit_data = replace(world.data, path=str(world.corpus))
    run_fit(world.model, fit_data, FactorSettings(path=str(store), max_sequences=6), world.root / "fit", {}, progress=False)
    world.factors = FactorSettings(path=str(store))
    first = sweep(world, "2025-01-01")
    assert first.fresh
    expected, expected_tokens = reference(world)
    assert_same_table(*current(world)[:1], expected, current(world)[1], expected_tokens)
    assert sweep(world, "2025-01-01").noop

    run_fit(world.model, fit_data, FactorSettings(path=str(store), max_sequences=8), world.root / "fit", {}, progress=False)
    refit = sweep(world, "2025-01-02")
    assert refit.fresh and "factors fingerprint" in fresh_message(refit) and "model fingerprint" not in fresh_message(refit)
    expected, expected_tokens = reference(world, "reference-refit")
    assert_same_table(*current(world)[:1], expected, current(world)[1], expected_tokens)

    world.score = replace(world.score, top_k=3)
    smaller = sweep(world, "2025-01-03")
    assert "score.top_k 4 -> 3" in fresh_message(smaller)
    assert len(list((world.output / "archive").iterdir())) == 2
