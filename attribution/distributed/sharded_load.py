"""Load a model straight into its FSDP2 shards: no worker holds the whole model in host memory.

Every worker of the process group builds the model from ``config.json`` with its parameters on
the meta device (no memory), shards it (:func:`attribution.distributed.sharding.shard_model`),
and only then allocates its own shard of each parameter: rows ``[r ceil(n/W), (r+1) ceil(n/W))``
of an ``n``-row parameter on rank ``r`` of ``W``, read from the safetensors file(s) and nothing
else. Before that, the file is read once, one tensor at a time, for the model's fingerprint and
the check that every weight is finite. A worker's host memory while loading is its shards plus
one whole parameter; the load's one forward (the causal-attention check) gathers each FSDP
unit in turn, as any forward of the sharded model does, the root one (embedding, unembedding,
final norm) being the largest: on a GPU into device memory, on the CPU (gloo) into host memory,
where FSDP2's gather buffers come to a few times the unit's size.

The checkpoint is read as ``from_pretrained`` reads it: tensor names renamed as it renames them
(the model's registered renamings, such as GPT-NeoX's ``embed_out`` for ``lm_head``, legacy
names, the base-model prefix added or dropped), names the model does not have ignored,
a tied unembedding the same parameter as the embedding, non-persistent buffers (rotary
tables) as the model's constructor computes them, persistent ones from the file when it has them.

Loaded whole by :func:`attribution.models.load_model`, then sharded (each worker holds the whole
model once, as without this module): a directory whose weights are not safetensors
(``pytorch_model.bin``, a DeepSpeed ZeRO checkpoint folder); a model that ``from_pretrained``
keeps partly in float32 at the dtype asked (``_keep_in_fp32_modules``); a safetensors checkpoint that
needs converting on load (the per-expert weights of a fused mixture-of-experts model), that
holds both weights of a tied pair, that lacks a parameter or holds one in another shape, or
whose files or index cannot be read (the whole load then says what is wrong with them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from attribution.curvature.finite import check_parameter_counts, check_parameters, nonfinite_count
from attribution.distributed.sharding import shard_model
from attribution.models import (
    TrackedModule,
    check_causal,
    check_model_directory,
    check_tokenizer,
    empty_model,
    find_tracked_modules,
    fingerprint,
    load_model,
    load_tokenizer,
    loading_errors,
    model_fingerprint,
)
from attribution.zero_checkpoint import is_zero_checkpoint


@dataclass
class ShardedModel:
    """A model sharded over the process group, in eval mode, with its tokenizer.

    ``fingerprint``: :func:`attribution.models.model_fingerprint` of the whole model;
    ``streamed``: whether each worker read only its shards (False: loaded whole, then sharded).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    streamed: bool


def load_sharded_model(path: str | Path, trust_remote_code: bool, dtype: torch.dtype,
                       device: str | torch.device) -> ShardedModel:
    """The causal LM in ``path`` sharded over the current process group, every worker reading only its shards.

    Called by every worker of the group with the same arguments. The checks are those of
    :func:`attribution.models.load_model` (config, causal attention, tokenizer) and of
    :func:`attribution.curvature.finite.check_parameters` with owner ``model.path=<path>``;
    every worker reads the same files, so a broken model stops all of them before any collective.
    See the module docstring for the layouts that are loaded whole and then sharded.
    """
    directory = check_model_directory(path)
    files = _safetensors_files(directory)
    if files is None:
        return _load_whole_then_shard(path, trust_remote_code, dtype, device)
    with loading_errors(directory, trust_remote_code):
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
        model = empty_model(config, trust_remote_code, dtype)
        tokenizer = load_tokenizer(directory, trust_remote_code)
    model.eval()
    check_tokenizer(tokenizer, model, directory)
    tensors = _checkpoint_tensors(files)
    # from_pretrained keeps some modules of some models in float32 at a 16-bit dtype (its dtype plan); from_config does not.
    keeps_float32 = bool(model._get_dtype_plan(dtype))
    stored = _stored_entries(model, tensors) if tensors is not None and not keeps_float32 else None
    if stored is None:
        return _load_whole_then_shard(path, trust_remote_code, dtype, device)
    digest = _streamed_fingerprint(model, stored, f"model.path={path}")
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    shard_model(model)
    # Allocates each parameter's local shard only (and every buffer, anew: restored below).
    model.to_empty(device=device)
    _fill(model, stored, buffers)
    check_causal(model, directory)
    # FSDP2 keeps the root's parameters (embedding, unembedding) gathered after a forward, expecting a
    # backward: the check's forward would leave each worker holding them whole.
    model.reshard()
    return ShardedModel(model, tokenizer, digest, streamed=True)


def _load_whole_then_shard(path: str | Path, trust_remote_code: bool, dtype: torch.dtype,
                           device: str | torch.device) -> ShardedModel:
    """The whole model loaded by :func:`load_model`, checked and fingerprinted, then sharded."""
    model, tokenizer = load_model(path, trust_remote_code, dtype, device)
    check_parameters(model, f"model.path={path}")
    whole = model_fingerprint(model)
    shard_model(model)
    return ShardedModel(model, tokenizer, whole, streamed=False)


def _safetensors_files(directory: Path) -> list[Path] | None:
    """The safetensors files ``from_pretrained`` would read (one, or those of the sharded index), or
    None when the weights are in another layout (``pytorch_model.bin``, a DeepSpeed ZeRO checkpoint)
    or the index is not readable."""
    if is_zero_checkpoint(directory):
        return None
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return [directory / SAFE_WEIGHTS_NAME]
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return None
    try:
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def _checkpoint_tensors(files: list[Path]) -> dict[str, _Stored] | None:
    """Each tensor of the checkpoint by its key (the files' headers only are read); None if a file cannot be read."""
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                keys = handle.keys()
                tensors.update({key: _Stored(file, key, tuple(handle.get_slice(key).get_shape())) for key in keys})
        except (OSError, SafetensorError):
            return None
    return tensors


@dataclass(frozen=True)
class _Stored:
    """A tensor of the checkpoint: ``key`` in ``file``, of ``shape``."""

    file: Path
    key: str
    shape: tuple[int, ...]

    def read(self, block: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The whole tensor, or only ``block`` of it, as a tensor of its own.

        The file is opened for this one read: safetensors maps it into memory, and every page read
        counts in the process's resident memory until it is unmapped, so a handle kept open over
        the fingerprint pass would hold the whole file resident.
        """
        with safe_open(self.file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(self.key) if block is None else handle.get_slice(self.key)[block]


def _stored_entries(model: PreTrainedModel, tensors: dict[str, _Stored]) -> dict[str, _Stored] | None:
    """Where the file holds each state_dict entry, with the model's tied weights tied as ``from_pretrained``
    ties them; None when the file cannot be read tensor by tensor (it is then loaded whole).

    Keys are renamed as ``from_pretrained`` renames them: the model's registered renamings (GPT-NeoX's
    ``embed_out`` is ``lm_head``), legacy names, the base-model prefix added or dropped. Keys the model
    does not have are ignored, as ``from_pretrained`` ignores them (old checkpoints hold the attention
    masks and rotary tables that models now compute). Not read this way: a tensor that needs
    converting (per-expert weights fused on load), two keys for one entry, both weights of a tied pair
    (``from_pretrained`` ties them only if their values are equal), a parameter missing or of another shape.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict(keep_vars=True)
    stored: dict[str, _Stored] = {}
    for key, tensor in tensors.items():
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if name not in state and key in state:
            # As from_pretrained: a key that is already the model's name is not renamed away from it.
            name, converter = rename_source_key(key, [], [], model.base_model_prefix, state)
        if converter is not None or name in stored:
            return None
        if name in state:
            stored[name] = tensor
    if any(target in stored and source in stored for target, source in model.all_tied_weights_keys.items()):
        return None
    # A tied pair is one parameter, under the name of the weight the file holds (save_pretrained keeps one).
    model.tie_weights(missing_keys=set(state) - set(stored), recompute_mapping=False)
    whole = all(name in stored and stored[name].shape == tuple(parameter.shape) for name, parameter in model.named_parameters())
    return stored if whole else None


def _streamed_fingerprint(model: PreTrainedModel, stored: dict[str, _Stored], owner: str) -> str:
    """:func:`model_fingerprint` of the model the file makes, and :func:`check_parameters` on it, one parameter at a time."""
    counts: list[tuple[str, int, int]] = []

    def parameters() -> Iterator[tuple[str, torch.Tensor]]:
        for name, parameter in model.named_parameters():
            # Cast to the model's dtype first, as from_pretrained does: that is the weight the model uses.
            tensor = stored[name].read().to(parameter.dtype)
            counts.append((name, nonfinite_count(tensor), tensor.numel()))
            yield name, tensor

    digest = fingerprint(model.config, parameters())
    check_parameter_counts(counts, owner)
    return digest


@torch.no_grad()
def _fill(model: PreTrainedModel, stored: dict[str, _Stored], buffers: dict[str, torch.Tensor]) -> None:
    """Each parameter's local shard from its rows of the file; each buffer from the file where it is
    there (a persistent one), else as the constructor computed it (``buffers``).

    The block a worker holds is the DTensor's own chunk metadata, by which
    torch.distributed.checkpoint reads too: under FSDP2, rows ``[r ceil(n/W), (r+1) ceil(n/W))``.
    """
    for name, parameter in model.named_parameters():
        local = parameter.to_local()
        (chunk,) = parameter.__create_chunk_list__()
        if local.numel():
            local.copy_(stored[name].read(tuple(slice(offset, offset + size) for offset, size in zip(chunk.offsets, chunk.sizes))))
    for name, buffer in model.named_buffers():
        buffer.copy_(stored[name].read() if name in stored else buffers[name])


def load_worker_model(path: str | Path, trust_remote_code: bool, dtype: torch.dtype, device: str | torch.device,
                      sharding: str, tracked_modules: str) -> tuple[ShardedModel, list[TrackedModule]]:
    """The model as one worker holds it under ``cluster.sharding``, and its tracked modules.

    ``none``: whole. ``fsdp``: streamed into this worker's FSDP2 shards (:func:`load_sharded_model`).
    ``deepspeed``: loaded whole, then partitioned by ZeRO-3. The tracked modules' shapes, the
    fingerprint and (when sharded) the finiteness of every weight are taken from the whole weights,
    before any collective: a broken model stops every worker alike.
    """
    if sharding == "fsdp":
        loaded = load_sharded_model(path, trust_remote_code, dtype, device)
        return loaded, find_tracked_modules(loaded.model, tracked_modules)
    model, tokenizer = load_model(path, trust_remote_code, dtype, device)
    tracked = find_tracked_modules(model, tracked_modules)
    digest = model_fingerprint(model)
    if sharding != "none":
        check_parameters(model, f"model.path={path}")
        shard_model(model, sharding)
    return ShardedModel(model, tokenizer, digest, streamed=False), tracked
