"""``model.memory_gib``: the largest micro-batch whose every predicted stage fits, the refinement's query columns,
or one line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from attribution.scale.memory_model import SOLVER_VECTORS, RunShape, largest_part, stage_bytes
from attribution.scale.plan import (
    RUNTIME_GIB,
    MemoryBudgetError,
    plan_memory,
    plan_refinement,
    probed_shape,
    refine_within_memory,
)
from attribution.settings import DataSettings, ModelSettings, RefineSettings, ScoreSettings
from tests.jobs.helpers import overrides, run_job, tiny_inputs


def peak_gib(shape, batch, data, score):
    run = RunShape(batch=batch, sequence=data.max_length, queries=score.query_batch_size, query_batch=score.query_batch_size,
                   query_tokens=data.max_length, rank=score.rank)
    return max(stage_bytes(shape, run).values()) / 2**30 + RUNTIME_GIB


def test_the_largest_batch_within_the_budget_is_chosen(tmp_path):
    inputs = tiny_inputs(tmp_path)
    shape = probed_shape(ModelSettings(path=inputs["model.path"]))
    data, score = DataSettings(max_length=512, batch_size=8), ScoreSettings()
    between = (peak_gib(shape, 3, data, score) + peak_gib(shape, 4, data, score)) / 2
    assert peak_gib(shape, 3, data, score) < between < peak_gib(shape, 4, data, score)
    assert plan_memory(shape, data, score, between).batch_size == 3
    assert plan_memory(shape, data, score, 1000).batch_size == 8
    with pytest.raises(MemoryBudgetError, match=r"^model.memory_gib=0.5: the .* needs .* GiB even with data.batch_size=1 "
                                                 r"and data.max_length=512"):
        plan_memory(shape, data, score, 0.5)


def test_a_job_says_what_it_chose_and_a_budget_too_small_is_one_line(tmp_path):
    inputs = tiny_inputs(tmp_path)
    result, _ = run_job("fit_factors", *overrides(inputs, f"output_dir={tmp_path / 'out'}", "model.memory_gib=100",
                                                   job="fit_factors"))
    assert result.returncode == 0, result.stderr
    assert "model.memory_gib=100: data.batch_size 8 kept (predicted peak" in result.stdout
    small, _ = run_job("fit_factors", *overrides(inputs, f"output_dir={tmp_path / 'small'}", "model.memory_gib=0.5",
                                                  job="fit_factors"))
    assert small.returncode == 2
    assert len(small.stderr.strip().splitlines()) == 1
    assert small.stderr.startswith("ERROR: model.memory_gib=0.5: the ")


def refinement_gib(shape, data, score, refine, columns):
    run = RunShape(batch=data.batch_size, sequence=data.max_length, queries=score.query_batch_size,
                   query_batch=score.query_batch_size, query_tokens=data.max_length, refine_sequences=refine.max_sequences,
                   refine_length=data.max_length, refine_batch=refine.batch_size, refine_cached=refine.cached_sequences,
                   refine_columns=columns, refine_workers=refine.workers)
    return stage_bytes(shape, run)["refinement"] / 2**30 + RUNTIME_GIB


def test_the_refinement_is_planned_at_the_fewest_graph_rebuilds_or_auto_becomes_the_closed_form(tmp_path):
    inputs = tiny_inputs(tmp_path)
    shape = probed_shape(ModelSettings(path=inputs["model.path"]))
    data, score = DataSettings(max_length=512, batch_size=8), ScoreSettings()
    refine = RefineSettings(method="cg", columns=8)
    # Past the columns that go through the graphs together, each column adds only the solver's vectors over
    # every tracked parameter, in float32.
    nine, ten = refinement_gib(shape, data, score, refine, 9), refinement_gib(shape, data, score, refine, 10)
    assert (ten - nine) * 2**30 == pytest.approx(SOLVER_VECTORS * shape.tracked_parameters * 4)
    # A budget between three and four columns with every graph kept at batches of 8: fewer graphs kept, fewer
    # columns, or smaller product batches? Rebuilding costs ceil(16 / c) (64 - k) per step; the plan takes the
    # cheapest that fits (ties: the most columns, then the largest batch; graphs are kept in whole batches).
    between = (refinement_gib(shape, data, score, refine, 3) + refinement_gib(shape, data, score, refine, 4)) / 2
    planned, line = plan_refinement(shape, data, score, refine, between)
    costs = {}
    for batch in (8, 4, 2, 1):
        for columns in range(1, 9):
            for kept in range(0, 65, batch):
                setting = replace(refine, cached_sequences=kept, batch_size=batch)
                if refinement_gib(shape, data, score, setting, columns) <= between:
                    costs[(columns, kept, batch)] = (-(-16 // columns) * (64 - kept), -columns, -batch)
    cheapest = min(costs, key=costs.get)
    assert (planned.columns, planned.cached_sequences, planned.batch_size) == cheapest and planned.method == "cg"
    assert cheapest != (8, 64, 8)

    def change(key, before, after):
        return f"{key} {before} -> {after}" if before != after else f"{key} {after} kept"

    batch_change = f", refine.batch_size 8 -> {planned.batch_size}" if planned.batch_size != 8 else ""
    assert line.startswith(f"model.memory_gib={between:g}: {change('refine.columns', 8, planned.columns)}, "
                           f"{change('refine.cached_sequences', 64, planned.cached_sequences)}{batch_change} "
                           "(predicted refinement peak")
    assert plan_refinement(shape, data, score, refine, 1000)[0] == refine
    # Below one column with no kept graph, CG's product batches are halved (they change no score).
    eight = refinement_gib(shape, data, score, replace(refine, cached_sequences=0), 1)
    one = refinement_gib(shape, data, score, replace(refine, cached_sequences=0, batch_size=1), 1)
    assert one < eight
    halved, line = plan_refinement(shape, data, score, refine, (one + eight) / 2)
    assert halved.batch_size < 8 and "refine.batch_size 8 -> " in line
    small = one - 0.01
    closed, line = plan_refinement(shape, data, score, replace(refine, method="auto"), small)
    assert closed.method == "none" and "refine.method auto -> none: the refinement needs" in line
    with pytest.raises(MemoryBudgetError, match=r"^model.memory_gib=.*: refine.method=cg: the refinement needs .* GiB even with "
                                                 r"refine.columns=1, refine.cached_sequences=0 and refine.batch_size=1 "
                                                 r".*set refine.method=none$"):
        plan_refinement(shape, data, score, refine, small)


def test_refine_workers_hold_the_graphs_of_their_parts_so_a_budget_keeps_more(tmp_path):
    """A budget in which one process keeps 16 of the sample's 64 graphs keeps them all on 4 workers (16 each,
    nothing rebuilt), and the solving process, which keeps none, still has to fit its vectors."""
    assert [largest_part(64, 8, workers) for workers in (0, 1, 3, 4, 16)] == [64, 64, 24, 16, 8]
    assert largest_part(5, 8, 2) == 5
    inputs = tiny_inputs(tmp_path)
    shape = probed_shape(ModelSettings(path=inputs["model.path"]))
    data, score = DataSettings(max_length=512, batch_size=8), ScoreSettings(query_batch_size=1)
    refine = RefineSettings(method="cg", columns=1, cached_sequences=64, max_sequences=64, batch_size=1)
    sixteen = refinement_gib(shape, data, score, replace(refine, cached_sequences=16), 1)
    alone, _ = plan_refinement(shape, data, score, refine, sixteen)
    assert alone.cached_sequences == 16
    pooled, line = plan_refinement(shape, data, score, replace(refine, workers=4), sixteen)
    assert pooled.cached_sequences == 64 and "refine.cached_sequences 64 kept" in line
    assert refinement_gib(shape, data, score, replace(refine, workers=4), 1) <= sixteen
    assert refinement_gib(shape, data, score, replace(refine, workers=64), 1) < refinement_gib(
        shape, data, score, replace(refine, workers=4), 1)


def test_a_multi_stage_refinement_is_planned_with_both_models(tmp_path):
    """Two stages hold two models and eigen-forms and one more vector per query: the same budget keeps less."""
    inputs = tiny_inputs(tmp_path)
    shape = probed_shape(ModelSettings(path=inputs["model.path"]))
    data, score = DataSettings(max_length=512, batch_size=8), ScoreSettings()
    refine = RefineSettings(method="cg", columns=4, cached_sequences=64, max_sequences=64)
    budget = refinement_gib(shape, data, score, refine, 4)
    single, _ = plan_refinement(shape, data, score, refine, budget)
    double, _ = plan_refinement(shape, data, score, refine, budget, stages=2)
    assert (single.columns, single.cached_sequences) == (4, 64)
    assert (double.columns, double.cached_sequences, double.batch_size) < (4, 64, 8)


def test_a_score_job_says_how_the_refinement_was_planned(tmp_path):
    inputs = tiny_inputs(tmp_path)
    out = tmp_path / "out"
    fitted, _ = run_job("fit_factors", *overrides(inputs, f"output_dir={out}", job="fit_factors"))
    assert fitted.returncode == 0, fitted.stderr
    planned, _ = run_job("score", *overrides(inputs, f"output_dir={out}", "model.memory_gib=100", "refine.method=cg",
                                              "refine.steps=1", job="score"))
    assert planned.returncode == 0, planned.stderr
    assert "model.memory_gib=100: refine.columns 8 kept, refine.cached_sequences 64 kept (predicted refinement peak" \
        in planned.stdout
    # What the jobs call: no plan without a budget or for the gradient dot product; auto -> none below the least.
    model = ModelSettings(path=inputs["model.path"])
    data, score, auto = DataSettings(max_length=16), ScoreSettings(), RefineSettings(method="auto")
    assert refine_within_memory(model, data, score, auto, "ekfac", False) == (auto, None)
    budgeted = replace(model, memory_gib=RUNTIME_GIB + 1e-6)
    assert refine_within_memory(budgeted, data, score, auto, "identity", False) == (auto, None)
    closed, line = refine_within_memory(budgeted, data, score, auto, "ekfac", False)
    assert closed.method == "none" and "refine.method auto -> none: the refinement needs" in line
