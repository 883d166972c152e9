"""Load a causal language model from a local directory, find its tracked modules, fingerprint it.

A *tracked module* is a linear map ``s = W a (+ b)`` inside the transformer blocks.
Its gradients are always handled in the ``(d_out, d_in')`` layout of ``torch.nn.Linear``
with the bias as an extra input column (``d_in' = d_in + 1``), also for GPT-2's
``Conv1D``, whose weight is stored transposed, and for one expert of a fused
mixture-of-experts layer, whose weight is a slice of a 3-D parameter (:mod:`attribution.experts`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from attribution.errors import UserError
from attribution.experts import ExpertLinear, expert_views, is_fused_experts

# A module inside a block has a numeric path component: "gpt_neox.layers.3.mlp.dense_h_to_4h".
_BLOCK_COMPONENT = re.compile(r"\.\d+\.")
# The names a mixture-of-experts block gives the router beside its experts.
_ROUTER_NAMES = ("gate", "router")
_CONFIG_KEYS_NOT_FINGERPRINTED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                              "tokenizer.model", "spiece.model", "special_tokens_map.json"})


class ModelError(UserError, ValueError):
    """A model directory that cannot be loaded, or a module selection that matches nothing."""


@dataclass(frozen=True)
class ParameterSlice:
    """Where a tracked weight or bias is stored: ``parameter`` itself, or its ``index``-th slice along
    the first dimension (one expert of a fused parameter); ``transposed``: a weight stored (d_in, d_out)."""

    parameter: nn.Parameter
    index: int | None = None
    transposed: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor``, shaped (..., *parameter.shape), in the (d_out, d_in) or (d_out,) layout."""
        if self.index is not None:
            tensor = tensor.select(tensor.dim() - self.parameter.dim(), self.index)
        return tensor.mT if self.transposed else tensor


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
        """GPT-2's Conv1D, and the experts of some fused layers (gpt-oss), store the weight as (d_in, d_out)."""
        return isinstance(self.module, Conv1D) or (isinstance(self.module, ExpertLinear) and self.module.transposed)

    @property
    def storage(self) -> tuple[ParameterSlice, ...]:
        """Where the weight, then the bias if any, are stored."""
        if isinstance(self.module, ExpertLinear):
            index, weight, bias = self.module.expert, self.module.fused_weight, self.module.fused_bias
        else:
            index, weight, bias = None, self.module.weight, self.module.bias
        pieces = (ParameterSlice(weight, index, self.transposed),)
        return pieces + (ParameterSlice(bias, index),) if self.bias else pieces

    def weight_gradient(self) -> torch.Tensor:
        """The accumulated ``.grad`` of weight and bias as one (d_out, d_in') matrix."""
        gradients = []
        for piece in self.storage:
            if piece.parameter.grad is None:
                raise ModelError(f"module {self.name} has no accumulated gradient")
            gradients.append(piece.take(piece.parameter.grad))
        if self.bias:
            return torch.cat([gradients[0], gradients[1].unsqueeze(1)], dim=1)
        return gradients[0]


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, in eval mode (no dropout).

    The weights come from the directory's weights file (``from_pretrained``) or, when it has
    none, from a DeepSpeed ZeRO checkpoint in it (:mod:`attribution.zero_checkpoint`).

    Checked, not assumed: the model must attend causally (an encoder such as BERT also loads
    as a "causal LM" head, with bidirectional attention) and the tokenizer must have a
    vocabulary that fits the model's embedding; otherwise ModelError naming the directory.
    """
    # Imported here: it imports ModelError from this module.
    from attribution.zero_checkpoint import is_zero_checkpoint, load_zero_checkpoint

    directory = check_model_directory(path)
    with loading_errors(directory, trust_remote_code):
        if is_zero_checkpoint(directory):
            model = load_zero_checkpoint(directory, trust_remote_code, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype
            )
        tokenizer = load_tokenizer(directory, trust_remote_code)
    model.to(device)
    model.eval()
    check_causal(model, directory)
    check_tokenizer(tokenizer, model, directory)
    return model, tokenizer


def check_model_directory(path: str | Path) -> Path:
    """``path`` as a model directory that has a readable config.json and weights (a weights file or a
    DeepSpeed ZeRO checkpoint); else ModelError naming what is missing."""
    # Imported here: it imports ModelError from this module.
    from attribution.zero_checkpoint import has_weight_files, is_zero_checkpoint

    directory = Path(path)
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    zero = is_zero_checkpoint(directory)
    if not (directory / "config.json").is_file():
        if zero:
            raise ModelError(
                f"model directory {directory} is a DeepSpeed ZeRO checkpoint without config.json: save the model's config and "
                "tokenizer into it (model.config.save_pretrained, tokenizer.save_pretrained), as the Hugging Face Trainer does"
            )
        raise ModelError(f"model directory {directory} has no config.json")
    _check_config(directory)
    if not zero and not has_weight_files(directory):
        raise ModelError(
            f"model directory {directory} has no weights: no model.safetensors or pytorch_model.bin (or their sharded index), "
            "and no DeepSpeed ZeRO checkpoint ('latest' and a global_step* folder)"
        )
    return directory


@contextmanager
def loading_errors(directory: Path, trust_remote_code: bool) -> Iterator[None]:
    """What transformers raises while reading ``directory`` (config, weights, tokenizer) as one ModelError line."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ModelError(
                f"model directory {directory} needs its own Python code (config.json auto_map names classes "
                "transformers does not have); it runs only with model.trust_remote_code=true: set it if you trust that code"
            ) from error
        raise ModelError(f"cannot load a causal LM and tokenizer from {directory}: {error}") from error


def load_tokenizer(directory: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``directory`` (inside :func:`loading_errors`)."""
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)


def empty_model(config: PretrainedConfig, trust_remote_code: bool, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM of ``config`` with its parameters on the meta device (no memory, no initialisation);
    buffers (rotary tables) are real, computed by the constructor."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)


def _check_config(directory: Path) -> None:
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"model directory {directory}: config.json is not readable JSON ({error})") from error


def check_causal(model: PreTrainedModel, directory: Path | str) -> None:
    """A causal LM's prediction at position t must not depend on tokens after t.

    Tested directly: changing the last token of a short input must leave the logits of every
    earlier position unchanged (up to float rounding).
    """
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"model directory {directory}: {name} is an encoder-decoder model; a decoder-only causal LM is needed")
    vocab = model.get_input_embeddings().num_embeddings
    length = min(8, getattr(model.config, "max_position_embeddings", None) or 8)
    device = next(model.parameters()).device
    ids = torch.arange(1, length + 1, device=device).remainder(vocab).unsqueeze(0)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    with torch.no_grad():
        before = model(input_ids=ids).logits[0, :-1].float()
        after = model(input_ids=changed).logits[0, :-1].float()
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        # Inconclusive: a NaN or Inf anywhere leaks through an additive attention mask. Scoring
        # records the documents whose scores are not finite as skips.
        return
    scale = float(before.abs().max()) or 1.0
    if not torch.allclose(before, after, rtol=1e-3, atol=1e-4 * scale):
        hint = " (config.json has is_decoder=false)" if getattr(model.config, "is_decoder", None) is False else ""
        raise ModelError(
            f"model directory {directory}: {name} does not attend causally{hint}: changing the last of {length} "
            "tokens changed the predictions before it; an encoder (BERT, RoBERTa, ...) is not a causal LM"
        )


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, directory: Path | str) -> None:
    """The tokenizer has tokens beyond its special ones, and every id has an embedding row."""
    vocabulary = tokenizer.get_vocab()
    regular = set(vocabulary.values()) - set(tokenizer.all_special_ids)
    if not regular:
        present = sorted(p.name for p in Path(directory).iterdir() if p.name in _TOKENIZER_FILES)
        raise ModelError(
            f"model directory {directory}: its tokenizer has no vocabulary (only {len(vocabulary)} special tokens; "
            f"tokenizer files there: {', '.join(present) or 'none'}); save the model's tokenizer beside it "
            "(tokenizer.save_pretrained)"
        )
    rows = model.get_input_embeddings().num_embeddings
    largest = max(vocabulary.values())
    if largest >= rows:
        raise ModelError(
            f"model directory {directory}: the tokenizer has token ids up to {largest} but the model embeds "
            f"only {rows}; the tokenizer does not belong to this model"
        )


def in_block(name: str) -> bool:
    """Whether a module or parameter name lies inside a transformer block (a numeric path component)."""
    return _BLOCK_COMPONENT.search(name) is not None


def _as_tracked(name: str, module: nn.Module) -> TrackedModule | None:
    if isinstance(module, (nn.Linear, ExpertLinear)):
        bias = module.bias is not None if isinstance(module, nn.Linear) else module.bias_name is not None
        return TrackedModule(name, module, module.in_features, module.out_features, bias)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return TrackedModule(name, module, d_in, d_out, module.bias is not None)
    return None


def find_tracked_modules(model: nn.Module, selection: str = "all") -> list[TrackedModule]:
    """Tracked modules in model order.

    ``all``: every linear map inside the transformer blocks (embeddings, unembedding and
    norms are outside or not linear); ``mlp``: those under an ``mlp`` submodule; anything
    else is a regular expression searched in the names of all linear modules.

    A fused mixture-of-experts layer contributes one module per expert and projection,
    ``...experts.<e>.gate_up_proj`` and ``...experts.<e>.down_proj`` (views installed on the
    model on the first call, :mod:`attribution.experts`); its router never does (its gradient
    flows through a discrete top-k choice). A mixture-of-experts layer of any other layout that
    the selection covers is refused, never left out.
    """
    selected = _selector(selection)
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            if module._is_expert_parallel:
                raise ModelError(f"module {name} is sharded by expert parallelism; its experts can be tracked only whole, "
                                 "on one device")
            expert_views(module)
    routers = _routers(model)
    linears = [tracked for name, module in model.named_modules()
               if not _inside(name, routers) and (tracked := _as_tracked(name, module))]
    _refuse_untrackable_experts(model, selection, selected, routers)
    chosen = [t for t in linears if selected(t.name)]
    if not chosen:
        names = ", ".join(t.name for t in linears[:8]) or "none: the model has no linear module"
        where = getattr(model, "name_or_path", "") or type(model).__name__
        raise ModelError(f"model.tracked_modules={selection!r} matches no linear module of {where} (some are: {names})")
    return chosen


def _selector(selection: str) -> Callable[[str], bool]:
    """Whether ``model.tracked_modules`` covers a module, by its name."""
    if selection == "all":
        return lambda name: bool(_BLOCK_COMPONENT.search(name))
    if selection == "mlp":
        return lambda name: bool(_BLOCK_COMPONENT.search(name)) and ".mlp." in f".{name}."
    try:
        pattern = re.compile(selection)
    except re.error as error:
        raise ModelError(f"model.tracked_modules={selection!r} is not a valid regular expression: {error}") from error
    return lambda name: bool(pattern.search(name))


def _inside(name: str, ancestors: set[str]) -> bool:
    return any(name == ancestor or name.startswith(f"{ancestor}.") for ancestor in ancestors)


def _routers(model: nn.Module) -> set[str]:
    """Names of the routers: the ``gate``/``router`` (or ``*Router*`` class) beside each fused experts module."""
    modules = dict(model.named_modules())
    routers = set()
    for name, module in modules.items():
        if is_fused_experts(module) and "." in name:
            parent = name.rsplit(".", 1)[0]
            routers.update(f"{parent}.{child_name}" for child_name, child in modules[parent].named_children()
                           if child_name in _ROUTER_NAMES or "Router" in type(child).__name__)
    return routers


def _refuse_untrackable_experts(model: nn.Module, selection: str, selected: Callable[[str], bool], routers: set[str]) -> None:
    """ModelError for the first mixture-of-experts layer covered by the selection whose experts cannot be tracked.

    Only the fused experts of the ``use_experts_implementation`` contract are tracked. Others are
    recognised by name: a module called ``experts`` or ``*expert`` or of an ``*Expert*`` class,
    that keeps matrices of its own (stacked experts: JetMoE, Llama 4, DBRX, fused shared experts)
    or, unless it is a shared expert (which sees every token), holds modules with parameters (one
    module per expert, each seeing only its routed tokens). In a model whose config counts
    experts, so is any other parameter of three or more dimensions that stacks that many.
    """
    modules = dict(model.named_modules())
    fused = {name for name, module in modules.items() if is_fused_experts(module)}
    experts = _expert_count(model)
    for name, module in modules.items():
        if _inside(name, fused) or _inside(name, routers) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        attribute, kind = name.rsplit(".", 1)[-1], type(module).__name__
        matrices = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        if attribute.lower().endswith(("experts", "expert")) or "Expert" in kind:
            shared = "shared" in f"{attribute}{kind}".lower()
            untrackable = bool(matrices) or (not shared and any(True for _ in module.parameters()))
        else:
            matrices = [(n, shape) for n, shape in matrices if len(shape) >= 3 and shape[0] == experts]
            untrackable = bool(matrices)
        if untrackable and any(selected(n) for n in modules if _inside(n, {name})):
            detail = f" ({matrices[0][0]} is one {matrices[0][1]} tensor)" if matrices else ""
            raise ModelError(
                f"model.tracked_modules={selection!r} covers {name} ({kind}), mixture-of-experts weights that cannot be "
                f"tracked{detail}: only the fused experts of transformers' use_experts_implementation can; "
                "leave them out with a model.tracked_modules regex that does not match them"
            )


def _expert_count(model: nn.Module) -> int | None:
    """The number of experts a mixture-of-experts config declares, if any."""
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
            if isinstance(value := getattr(source, key, None), int) and value > 1:
                return value
    return None


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 of the architecture config and every named parameter in float32.

    All parameters, not just the tracked ones: the factors depend on every weight through
    the activations, and a store fitted on all modules must serve a run that tracks a
    subset (``mlp``, or the modules two models share).
    """
    return fingerprint(model.config, ((name, parameter.detach()) for name, parameter in model.named_parameters()))


def fingerprint(config: PretrainedConfig, parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`model_fingerprint` of a model with ``config`` whose ``named_parameters()`` are ``parameters``
    (an iterable, so they can be read one at a time)."""
    kept = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, parameter in parameters:
        digest.update(name.encode())
        # The array itself is hashed (buffer protocol): no copy of a float32 weight on the CPU.
        digest.update(parameter.to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()[:32]
