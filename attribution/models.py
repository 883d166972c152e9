"""Load a causal language model from a local directory, find its tracked modules, fingerprint it.

A *tracked module* is a linear map ``s = W a (+ b)`` inside the transformer blocks.
Its gradients are always handled in the ``(d_out, d_in')`` layout of ``torch.nn.Linear``
with the bias as an extra input column (``d_in' = d_in + 1``), also for GPT-2's
``Conv1D``, whose weight is stored transposed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from attribution.errors import UserError

# A module inside a block has a numeric path component: "gpt_neox.layers.3.mlp.dense_h_to_4h".
_BLOCK_COMPONENT = re.compile(r"\.\d+\.")
_CONFIG_KEYS_NOT_FINGERPRINTED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


class ModelError(UserError, ValueError):
    """A model directory that cannot be loaded, or a module selection that matches nothing."""


@dataclass(frozen=True)
class TrackedModule:
    """One linear map whose weight gradient enters the influence score."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool

    @property
    def d_in_augmented(self) -> int:
        """Input width with the bias folded in as a constant-one input."""
        return self.d_in + int(self.bias)

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores its weight as (d_in, d_out)."""
        return isinstance(self.module, Conv1D)

    def weight_gradient(self) -> torch.Tensor:
        """The accumulated ``.grad`` of weight and bias as one (d_out, d_in') matrix."""
        weight_grad = self.module.weight.grad
        if weight_grad is None:
            raise ModelError(f"module {self.name} has no accumulated gradient")
        matrix = weight_grad.T if self.transposed else weight_grad
        if self.bias:
            matrix = torch.cat([matrix, self.module.bias.grad.unsqueeze(1)], dim=1)
        return matrix


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, in eval mode (no dropout)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelError(f"model directory {directory} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a causal LM and tokenizer from {directory}: {error}") from error
    model.to(device)
    model.eval()
    return model, tokenizer


def _as_tracked(name: str, module: nn.Module) -> TrackedModule | None:
    if isinstance(module, nn.Linear):
        return TrackedModule(name, module, module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return TrackedModule(name, module, d_in, d_out, module.bias is not None)
    return None


def find_tracked_modules(model: nn.Module, selection: str = "all") -> list[TrackedModule]:
    """Tracked modules in model order.

    ``all``: every linear map inside the transformer blocks (embeddings, unembedding and
    norms are outside or not linear); ``mlp``: those under an ``mlp`` submodule; anything
    else is a regular expression searched in the names of all linear modules.
    """
    linears = [tracked for name, module in model.named_modules() if (tracked := _as_tracked(name, module))]
    if selection == "all":
        chosen = [t for t in linears if _BLOCK_COMPONENT.search(t.name)]
    elif selection == "mlp":
        chosen = [t for t in linears if _BLOCK_COMPONENT.search(t.name) and ".mlp." in f".{t.name}."]
    else:
        try:
            pattern = re.compile(selection)
        except re.error as error:
            raise ModelError(f"model.tracked_modules={selection!r} is not a valid regular expression: {error}") from error
        chosen = [t for t in linears if pattern.search(t.name)]
    if not chosen:
        names = ", ".join(t.name for t in linears[:8])
        raise ModelError(f"model.tracked_modules={selection!r} matches no linear module (some are: {names})")
    return chosen


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 of the architecture config and every named parameter in float32.

    All parameters, not just the tracked ones: the factors depend on every weight through
    the activations, and a store fitted on all modules must serve a run that tracks a
    subset (``mlp``, or the modules two models share).
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_KEYS_NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
