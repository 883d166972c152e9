"""The memory model multiplied out to whole real models on a given accelerator.

Each real model is built with one block from its real config (bfloat16, on the CPU) so that
:func:`~attribution.scale.memory_model.model_shape` can probe what autograd keeps per token; the
shape is then taken to the model's full depth. Time is the stage's multiply-adds at a stated share
of the device's peak (``efficiency``); a stage is *compute-bound* when that exceeds the time to read
the weights twice per micro-batch at the device's memory bandwidth, *memory-bound* otherwise, and
*does not fit* when its peak exceeds the device's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from attribution.scale.memory_model import ModelShape, RunShape, model_shape, stage_bytes, stage_multiply_adds


def _llama(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=128_256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                       tie_word_embeddings=tied, rope_theta=500_000.0)


REAL_MODELS: dict[str, PretrainedConfig] = {
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, tied=True),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, tied=False),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, tied=False),
}


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    peak_multiply_adds: float  # per second, bfloat16 dense
    bandwidth: float  # bytes per second


H200 = Device("H200", 141e9, 989e12 / 2, 4.8e12)


@dataclass
class ProjectedStage:
    stage: str
    gib: float
    hours: float | None
    bound: str


def real_shape(name: str) -> ModelShape:
    """The shape of real model ``name`` at its full depth, probed on one of its blocks in bfloat16."""
    config = REAL_MODELS[name]
    layers = config.num_hidden_layers
    one_block = replace_layers(config, 1)
    model = AutoModelForCausalLM.from_config(one_block, dtype=torch.bfloat16).eval()
    return model_shape(model, probe=(16, 32, 64)).with_blocks(layers)


def replace_layers(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    copy = config.__class__(**config.to_dict())
    copy.num_hidden_layers = layers
    return copy


def project(shape: ModelShape, run: RunShape, corpus_tokens: float, device: Device = H200,
            efficiency: float = 0.4) -> list[ProjectedStage]:
    """Per stage: peak GiB on one device; hours for ``corpus_tokens`` (passes over the corpus) or one query
    batch; and which bound binds."""
    memory = stage_bytes(shape, run)
    work = stage_multiply_adds(shape, run)
    micro_batch_tokens = run.batch * run.sequence
    batches = corpus_tokens / micro_batch_tokens
    stages = []
    for stage, peak in memory.items():
        hours, bound = None, "fits"
        if stage in work:
            count = 1 if stage == "query gradients" else batches
            compute = count * work[stage] / (efficiency * device.peak_multiply_adds)
            reading = count * 2 * shape.weight_bytes / device.bandwidth
            hours = max(compute, reading) / 3600
            bound = "compute" if compute >= reading else "memory bandwidth"
        if peak > device.memory_bytes:
            bound = "does not fit"
        stages.append(ProjectedStage(stage, peak / 2**30, hours, bound))
    return stages


def format_projection(name: str, shape: ModelShape, run: RunShape, stages: list[ProjectedStage], corpus_tokens: float,
                      device: Device = H200) -> str:
    lines = [f"{name} on one {device.name} ({device.memory_bytes / 2**30:.0f} GiB), batch {run.batch} x {run.sequence} tokens, "
             f"Q = {run.queries}, r = {run.rank}; weights {shape.weight_bytes / 2**30:.1f} GiB; "
             f"hours per {corpus_tokens:.0e} tokens (query gradients: one batch of queries)",
             f"  {'stage':<22} {'peak GiB':>9} {'hours':>8}  bound"]
    for stage in stages:
        hours = "-" if stage.hours is None else f"{stage.hours:.2f}"
        lines.append(f"  {stage.stage:<22} {stage.gib:>9.1f} {hours:>8}  {stage.bound}")
    return "\n".join(lines)


