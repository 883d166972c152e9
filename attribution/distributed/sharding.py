"""Parameter sharding of the model inside the Ray workers, for models too big for one worker.

``cluster.sharding=fsdp``: FSDP2 (``fully_shard``) on every transformer block and on the root:
each worker keeps 1/W of the parameters and gathers a block's weights only while that block
runs. The tracked linear modules stay the same objects under the same names, and their forward
hooks see full inputs and output gradients, so the curvature capture and the scoring
contractions need no change. Every worker must run the same number of forward and backward
passes (:func:`attribution.curvature.fit.in_lockstep`), as each pass gathers from all of them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution.errors import UserError


class ShardingError(UserError, ValueError):
    """A model that cannot be sharded as asked (``cluster.sharding``)."""


def shard_model(model: PreTrainedModel, engine: str = "fsdp") -> int:
    """Shard ``model`` in place over the current process group with ``engine``; the number of blocks sharded."""
    if engine == "fsdp":
        return fully_shard_blocks(model)
    raise ShardingError(f"cluster.sharding={engine}: unknown sharding engine (fsdp)")


def transformer_blocks(model: PreTrainedModel) -> list:
    """The blocks: the classes the model declares unsplittable (``_no_split_modules``), the unit
    transformers itself uses to place a model over devices."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise ShardingError(f"{type(model).__name__} declares no transformer block classes (_no_split_modules): "
                            "cannot shard it; set cluster.sharding=none")
    return blocks


def fully_shard_blocks(model: PreTrainedModel) -> int:
    """FSDP2 on every block, then on the root (embeddings, final norm, output layer)."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def parameters_held(model: torch.nn.Module) -> int:
    """Parameter elements in this process: all of them, or this worker's shards of a sharded model."""
    return sum(_local(parameter).numel() for parameter in model.parameters())


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's own shard (a DTensor's local tensor); any other parameter itself."""
    to_local = getattr(parameter, "to_local", None)
    return to_local() if to_local is not None else parameter
