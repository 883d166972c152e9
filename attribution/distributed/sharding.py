"""Parameter sharding of the model inside the fit workers, for models too big for one worker.

FSDP2 (``fully_shard``) on every transformer block and on the root: each worker keeps 1/W of
the parameters and gathers a block's weights only while that block runs. The tracked linear
modules stay the same objects under the same names, and their forward hooks see full inputs
and output gradients, so the curvature capture needs no change.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from attribution.errors import UserError


class ShardingError(UserError, ValueError):
    """A model that cannot be sharded as asked (``cluster.shard_model``)."""


def shard_model(model: PreTrainedModel) -> int:
    """Shard ``model`` in place over the current process group; the number of blocks sharded.

    The blocks are the classes the model declares unsplittable (``_no_split_modules``), the
    unit transformers itself uses to place a model over devices.
    """
    from torch.distributed.fsdp import fully_shard

    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise ShardingError(f"{type(model).__name__} declares no transformer block classes (_no_split_modules): "
                            "cannot shard it; set cluster.shard_model=false")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)
