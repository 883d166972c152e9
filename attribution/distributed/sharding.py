"""Parameter sharding of the model inside the Ray workers, for models too big for one worker.

``cluster.sharding=fsdp``: FSDP2 (``fully_shard``) on every transformer block and on the root:
each worker keeps 1/W of the parameters and gathers a block's weights only while that block
runs. The tracked linear modules stay the same objects under the same names, and their forward
hooks see full inputs and output gradients, so the curvature capture and the scoring
contractions need no change. Every worker must run the same number of forward and backward
passes (:func:`attribution.curvature.fit.in_lockstep`), as each pass gathers from all of them.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from transformers import PreTrainedModel

from attribution.errors import UserError


class ShardingError(UserError, ValueError):
    """A model that cannot be sharded as asked (``cluster.sharding``)."""


# A ZeRO-3 model's engine holds its hooks and partitions: kept as long as the model lives.
_ZERO3_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shard_model(model: PreTrainedModel, engine: str = "fsdp") -> None:
    """Shard ``model`` in place over the current process group with ``engine``: ``fsdp`` (FSDP2, every
    transformer block and the root) or ``deepspeed`` (ZeRO-3, every module, :mod:`attribution.distributed.zero3`)."""
    if engine == "fsdp":
        fully_shard_blocks(model)
    elif engine == "deepspeed":
        from attribution.distributed.zero3 import shard_with_zero3

        _ZERO3_ENGINES[model] = shard_with_zero3(model)
    else:
        raise ShardingError(f"cluster.sharding={engine}: unknown sharding engine (fsdp, deepspeed)")


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
    """FSDP2 on every block, then on the root (embeddings, final norm, output layer); the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that an in-place op on the root's output view would skip its backward gather; the
    # output here is only ever detached or backpropagated (attribution.log_prob), never modified.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def parameters_held(model: torch.nn.Module) -> int:
    """Parameter elements in this process: all of them, or this worker's shards of a sharded model."""
    return sum(_held(parameter) for parameter in model.parameters())


def _held(parameter: torch.Tensor) -> int:
    """Elements of ``parameter`` in this process: an FSDP2 parameter's local shard; a ZeRO-3 one's partition
    (``ds_tensor``, padded to a multiple of the workers) plus its data while gathered; any other whole."""
    partition = getattr(parameter, "ds_tensor", None)
    if partition is not None:
        return partition.numel() + parameter.data.numel()
    to_local = getattr(parameter, "to_local", None)
    return (to_local() if to_local is not None else parameter).numel()
