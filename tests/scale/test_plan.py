"""``model.memory_gib``: the largest micro-batch whose every predicted stage fits, or one line."""

from __future__ import annotations

import pytest

from attribution.scale.memory_model import RunShape, stage_bytes
from attribution.scale.plan import RUNTIME_GIB, MemoryBudgetError, plan_memory, probed_shape
from attribution.settings import DataSettings, ModelSettings, ScoreSettings
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
