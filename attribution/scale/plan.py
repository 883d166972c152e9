"""Settings that keep every stage inside ``model.memory_gib``: the micro-batch, and the refinement's query
columns, kept graphs and product batch, chosen from the memory model.

The model's shape comes from one of its blocks, built from its ``config.json`` with random weights
in the model's dtype (the widths, not the weights, set the memory) and probed as
:func:`~attribution.scale.memory_model.model_shape` does, then taken to the model's depth. The
micro-batch is the largest ``B <= data.batch_size`` whose predicted peak, over the stages of a fit
and a score run, leaves ``RUNTIME_GIB`` of the budget for the interpreter, the libraries and the
allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from attribution.errors import UserError
from attribution.scale.memory_model import ModelShape, RunShape, largest_part, model_shape, stage_bytes
from attribution.settings import DataSettings, ModelSettings, RefineSettings, ScoreSettings, torch_dtype

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


@lru_cache(maxsize=4)
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
                       dense_factors_mib=score.dense_factors_mib, normalize=score.normalize)
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


def plan_refinement(shape: ModelShape, data: DataSettings, score: ScoreSettings, refine: RefineSettings,
                    budget_gib: float, stages: int = 1) -> tuple[RefineSettings, str]:
    """``refine`` with the query columns ``c <= refine.columns``, kept graphs ``k <= refine.cached_sequences``
    and (CG only, where it changes no score) product batch ``b <= refine.batch_size`` that fit ``budget_gib``
    at the least rebuilding, and a line saying what was chosen. When nothing fits, ``auto`` becomes the
    closed form (the line says why) and an explicit ``cg`` or ``stochastic`` is an error naming the settings
    that would make it fit.

    Per CG step a query batch of ``Q`` costs ``Q n`` column passes over the graphs of its ``n`` sequences
    whatever ``c`` and ``k`` are, plus one rebuild of each unkept graph per solve, ``ceil(Q / c) (n - k)``:
    the plan minimises the rebuilds over the batches ``b`` (halving), columns and kept graphs that fit (ties:
    the most columns, then the largest batch). The sample is taken at ``refine.max_length``, else at
    ``data.max_length`` (the fit's, which the refinement samples by default); an unbounded sample
    (``refine.max_sequences`` null) counts as larger than any budget keeps. With ``refine.workers`` the
    graphs, their rebuilds and the budget are each worker's, over its part of the sample, and the solving
    process keeps only the vectors. ``stages`` 2 (multi-stage): both models and eigen-forms are held, and
    one more vector per column."""
    sequences = refine.max_sequences if refine.max_sequences is not None else UNBOUNDED_SAMPLE
    # With refine.workers, the graphs and their rebuilds are each worker's, over its part of the sample.
    held = largest_part(sequences, refine.batch_size, refine.workers)
    most_kept = 0 if refine.method == "stochastic" else min(held, refine.cached_sequences
                                                            if refine.cached_sequences is not None else held)

    def peak(batch: int, columns: int, kept: int) -> float:
        run = RunShape(batch=data.batch_size, sequence=data.max_length, queries=score.query_batch_size,
                       query_batch=score.query_batch_size, query_tokens=data.max_length,
                       refine_sequences=sequences, refine_length=refine.max_length or data.max_length, refine_batch=batch,
                       refine_cached=kept, refine_columns=columns, refine_workers=refine.workers, refine_stages=stages)
        return stage_bytes(shape, run)["refinement"] / 2**30 + RUNTIME_GIB

    def most_graphs_kept(batch: int, columns: int) -> int:
        """All of them, or by bisection over whole batches below that (graphs are kept a batch at a time,
        and with one rebuilt batch on top the peak grows with them)."""
        if peak(batch, columns, most_kept) <= budget_gib:
            return most_kept
        low, high = 0, (most_kept - 1) // batch
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if peak(batch, columns, middle * batch) <= budget_gib else (low, middle - 1)
        return low * batch

    batches = [refine.batch_size]
    while refine.method != "stochastic" and batches[-1] > 1:
        batches.append(batches[-1] // 2)
    plans = [(-(-score.query_batch_size // columns) * (part - kept), -columns, -batch, kept)
             for batch in batches for part in [largest_part(sequences, batch, refine.workers)]
             for columns in range(1, refine.columns + 1) if peak(batch, columns, 0) <= budget_gib
             for kept in [most_graphs_kept(batch, columns)]]
    if plans:
        _, negative_columns, negative_batch, kept = min(plans)
        batch = -negative_batch
        # The stochastic iteration keeps no graph, and a process that keeps every graph of its part keeps them
        # under any larger setting: those are left as the user gave them.
        every = refine.method == "stochastic" or kept >= largest_part(sequences, batch, refine.workers)
        planned = replace(refine, batch_size=batch, columns=-negative_columns,
                          cached_sequences=refine.cached_sequences if every else kept)
        changes = [f"{key} {before} -> {after}" if before != after else f"{key} {after} kept"
                   for key, before, after in (("refine.columns", refine.columns, planned.columns),
                                              ("refine.cached_sequences", refine.cached_sequences, planned.cached_sequences),
                                              ("refine.batch_size", refine.batch_size, batch))
                   if key != "refine.batch_size" or before != after]
        return planned, (f"model.memory_gib={budget_gib:g}: {', '.join(changes)} "
                         f"(predicted refinement peak {peak(batch, planned.columns, kept):.1f} GiB)")
    needs = (f"the refinement needs {peak(batches[-1], 1, 0):.1f} GiB even with refine.columns=1, refine.cached_sequences=0 "
             f"and refine.batch_size={batches[-1]} ({shape.tracked_parameters / 1e6:.0f}M tracked parameters)")
    if refine.method == "auto":
        return replace(refine, method="none"), f"model.memory_gib={budget_gib:g}: refine.method auto -> none: {needs}"
    raise MemoryBudgetError(f"model.memory_gib={budget_gib:g}: refine.method={refine.method}: {needs}; raise "
                            "model.memory_gib, track fewer modules, or set refine.method=none")


# Planned as "every sequence of the sample": more than any budget holds.
UNBOUNDED_SAMPLE = 10**9


def refine_within_memory(model: ModelSettings, data: DataSettings, score: ScoreSettings, refine: RefineSettings,
                         strategy: str, sharded: bool, stages: int = 1) -> tuple[RefineSettings, str | None]:
    """``refine`` planned within ``model.memory_gib`` (:func:`plan_refinement`) when a refinement would run."""
    if model.memory_gib is None or model.path is None or not Path(model.path, "config.json").is_file():
        return refine, None
    if not refine.resolved(strategy, sharded).enabled:
        return refine, None
    with torch.random.fork_rng(devices=[]):
        shape = probed_shape(model)
    return plan_refinement(shape, data, score, refine, model.memory_gib, stages)
