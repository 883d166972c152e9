"""Settings that keep every stage inside ``model.memory_gib``: the micro-batch, chosen from the memory model.

The model's shape comes from one of its blocks, built from its ``config.json`` with random weights
in the model's dtype (the widths, not the weights, set the memory) and probed as
:func:`~attribution.scale.memory_model.model_shape` does, then taken to the model's depth. The
micro-batch is the largest ``B <= data.batch_size`` whose predicted peak, over the stages of a fit
and a score run, leaves ``RUNTIME_GIB`` of the budget for the interpreter, the libraries and the
allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from attribution.errors import UserError
from attribution.scale.memory_model import ModelShape, RunShape, model_shape, stage_bytes
from attribution.settings import DataSettings, ModelSettings, ScoreSettings, torch_dtype

RUNTIME_GIB = 0.75


class MemoryBudgetError(UserError, ValueError):
    """Not even one sequence fits ``model.memory_gib``."""


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int
    peak_gib: float
    stage: str

    def line(self, asked: int, budget: float) -> str:
        change = f"data.batch_size {asked} -> {self.batch_size}" if self.batch_size != asked else f"data.batch_size {asked} kept"
        return f"model.memory_gib={budget:g}: {change} (predicted peak {self.peak_gib:.1f} GiB, at the {self.stage})"


def probed_shape(settings: ModelSettings) -> ModelShape:
    """The model's shape, from one block built from its config."""
    config = AutoConfig.from_pretrained(settings.path, local_files_only=True, trust_remote_code=settings.trust_remote_code)
    layers = int(config.num_hidden_layers)
    config.num_hidden_layers = 1
    block = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(settings.dtype),
                                             trust_remote_code=settings.trust_remote_code).eval()
    return model_shape(block, probe=(16, 32, 64)).with_blocks(layers)


FIT_STAGES = ("covariance pass", "eigendecomposition", "eigenvalue pass")
SCORE_STAGES = ("query gradients", "candidate pass", "token scores")


def plan_memory(shape: ModelShape, data: DataSettings, score: ScoreSettings, budget_gib: float,
                stages: tuple[str, ...] = FIT_STAGES + SCORE_STAGES) -> MemoryPlan:
    """The largest micro-batch up to ``data.batch_size`` whose ``stages`` all fit ``budget_gib``."""
    budget = (budget_gib - RUNTIME_GIB) * 2**30
    rank = score.rank or max(max(m.d_in, m.d_out) for m in shape.modules)
    for batch in range(data.batch_size, 0, -1):
        run = RunShape(batch=batch, sequence=data.max_length, queries=score.query_batch_size * score.query_batches_per_pass,
                       query_batch=score.query_batch_size, query_tokens=data.max_length, rank=rank,
                       dense_factors_mib=score.dense_factors_mib)
        stage, peak = max(((name, value) for name, value in stage_bytes(shape, run).items() if name in stages),
                          key=lambda item: item[1])
        if peak <= budget:
            return MemoryPlan(batch, peak / 2**30 + RUNTIME_GIB, stage)
    raise MemoryBudgetError(
        f"model.memory_gib={budget_gib:g}: the {stage} needs {peak / 2**30 + RUNTIME_GIB:.1f} GiB even with data.batch_size=1 "
        f"and data.max_length={data.max_length} (weights {shape.weight_bytes / 2**30:.1f} GiB); raise model.memory_gib, "
        "lower data.max_length, or track fewer modules (model.tracked_modules)"
    )


def within_memory(model: ModelSettings, data: DataSettings, score: ScoreSettings,
                  stages: tuple[str, ...] = FIT_STAGES + SCORE_STAGES) -> tuple[DataSettings, str | None]:
    """``data`` with the micro-batch that keeps ``stages`` within ``model.memory_gib``, and a line saying
    what was chosen."""
    if model.memory_gib is None or model.path is None or not Path(model.path, "config.json").is_file():
        return data, None
    with torch.random.fork_rng(devices=[]):
        shape = probed_shape(model)
    plan = plan_memory(shape, data, score, model.memory_gib, stages)
    return replace(data, batch_size=plan.batch_size), plan.line(data.batch_size, model.memory_gib)
