"""DeepSpeed ZeRO stage 3 as the parameter-sharding engine of the fit and score workers (``cluster.sharding=deepspeed``).

The alternative to FSDP2 (:mod:`attribution.distributed.sharding`). Each worker keeps a 1/W slice
(``param.ds_tensor``) of every parameter; DeepSpeed's hooks on every module gather a module's
parameters just before its forward and before its backward, and free them after. The model
stays the same object: it is called as usual, its output layer can be called on its own (as
:func:`attribution.log_prob.backward_log_prob` does), and the forward hooks of the tracked
linear modules see whole inputs and output gradients. No optimizer is built: DeepSpeed then
installs only its parameter-offload machinery (``DeepSpeedZeRoOffload``), the inference form of ZeRO-3.

One module call per backward is what DeepSpeed's release after backward counts on; the output
layer, called once in the model's forward (as the identity) and again per chunk of positions,
breaks that count and would stay gathered after every pass. A hook releases, at the end of each
backward pass through the model, whatever such a module left gathered.

Frozen parameters are gathered in backward too: DeepSpeed's pre-backward gather hangs on each
module's *outputs* (an autograd function applied in a forward hook), which require grad because
:class:`attribution.curvature.capture.GradientCapture` starts the graph at the input embeddings,
not on the parameters' own gradients.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from attribution.errors import UserError


class Zero3Error(UserError, RuntimeError):
    """A model or environment that DeepSpeed ZeRO-3 cannot shard (``cluster.sharding=deepspeed``)."""


@dataclass
class Zero3Model:
    """A model sharded in place by ZeRO-3, and the DeepSpeed engine whose hooks gather its parameters.

    ``model`` is the caller's own object; ``engine`` is kept so that its hooks and partitions live
    as long as the model is used, and :meth:`close` removes them.
    """

    model: PreTrainedModel
    engine: Any
    release_hook: RemovableHandle

    def close(self) -> None:
        """Remove DeepSpeed's hooks and ours; the parameters stay partitioned (call before the process group is destroyed)."""
        self.release_hook.remove()
        self.engine.destroy()


# DeepSpeed keeps a ZeRO-3 model in one of these dtypes, and casts the model to the one its config
# names: the config names the model's own.
_PRECISION_KEYS = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}


def zero3_config(dtype: torch.dtype = torch.float32, persistence_threshold: int = 0) -> dict[str, Any]:
    """The DeepSpeed config of an optimizer-free ZeRO-3 engine for a model in ``dtype`` (float32, bfloat16 or float16).

    ``persistence_threshold``: parameters of at most this many elements stay whole on every worker
    (norms and biases, to save their gathers); 0 partitions every parameter. Prefetching is off:
    :func:`attribution.log_prob.backward_log_prob` calls the output layer outside the model's
    forward order, which would invalidate the module trace prefetching relies on at every step.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": persistence_threshold,
            "stage3_prefetch_bucket_size": 0,
            # A module's parameters are freed as soon as it has run: with DeepSpeed's default (1e9 elements)
            # those used again within that distance (in backward) stay gathered, all of them in a small model.
            "stage3_max_reuse_distance": 0,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if _PRECISION_KEYS[dtype] is not None:
        config[_PRECISION_KEYS[dtype]] = {"enabled": True}
    return config


def shard_with_zero3(model: PreTrainedModel, persistence_threshold: int = 0) -> Zero3Model:
    """Partition ``model``'s parameters in place over the current process group with ZeRO-3.

    Every process of the default group must call this with the same model, after the group is
    initialised (:func:`attribution.distributed.cluster.init_process_group`, any backend), and must
    then run the same number of forward and backward passes (``FitConfig.lockstep``): every module
    call gathers from all of them. The model must be on its final device, in float32, bfloat16 or
    float16: DeepSpeed refuses float64 parameters (a Zero3Error says so).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise Zero3Error("cluster.sharding=deepspeed needs an initialised torch.distributed process group")
    if model.dtype not in _PRECISION_KEYS:
        raise Zero3Error(f"cluster.sharding=deepspeed: DeepSpeed ZeRO-3 keeps parameters in float32, bfloat16 or float16 only, "
                         f"not {model.dtype}; set model.dtype to one of those or use cluster.sharding=fsdp")
    deepspeed = _import_deepspeed()
    # DeepSpeed reads these from a launcher's environment even when the group exists. A Ray worker sees
    # only its own device (if any), as index 0.
    for name, value in (("RANK", dist.get_rank()), ("WORLD_SIZE", dist.get_world_size()), ("LOCAL_RANK", 0)):
        os.environ.setdefault(name, str(value))
    # DeepSpeed takes the group that is already there; on CPU it would otherwise first compile its
    # shared-memory all-reduce with g++ (~45 s), where gloo does the gathers.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine, *_ = deepspeed.initialize(model=model, config=zero3_config(model.dtype, persistence_threshold))
    # Without an optimizer, engine.optimizer is DeepSpeed's parameter offload (the gather/release hooks).
    return Zero3Model(model, engine, model.register_forward_hook(_release_after_backward(engine.optimizer.release_backward_leftovers)))


def _release_after_backward(release: Callable[[], None]) -> Callable:
    """A forward hook for the root module: ``release`` runs once the backward pass through its output is done."""

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        # The logits (the last hidden states under backward_log_prob's identity output layer), first of a
        # tuple or of a transformers ModelOutput; every backward pass through the model starts from them.
        first = output if isinstance(output, torch.Tensor) else output[0]
        if isinstance(first, torch.Tensor) and first.requires_grad:
            # A tensor hook runs inside the backward pass; a queued callback runs when that pass ends.
            first.register_hook(lambda gradient: torch.autograd.Variable._execution_engine.queue_callback(release))

    return hook


def _import_deepspeed() -> Any:
    """``deepspeed``, set to run without its compiled ops, or a Zero3Error saying why it cannot be used."""
    # An import can fail in many ways (no CUDA, no compiler, a broken build); each means deepspeed is not usable here.
    try:
        import deepspeed
    except Exception as error:
        raise Zero3Error(f"cluster.sharding=deepspeed: deepspeed cannot be imported ({type(error).__name__}: {error}); "
                         "install it or use cluster.sharding=fsdp") from error
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    return deepspeed
