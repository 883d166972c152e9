"""A DeepSpeed ZeRO checkpoint folder as a model: found, checked, consolidated with DeepSpeed's own API.

``engine.save_checkpoint(folder)`` of a DeepSpeed run writes ``folder/latest`` (the tag of the
newest complete checkpoint, such as ``global_step100``) and ``folder/<tag>/`` with one set of
files per rank: ``*_model_states.pt`` (parameter names and shapes, buffers) and
``*_optim_states.pt`` (that rank's partition of the fp32 master weights, with Adam's moments).
ZeRO stages 1 and 2 split the optimizer state over the ranks, stage 3 the parameters too; either
way the whole model exists only as the concatenation of every rank's partition. DeepSpeed writes
no ``config.json`` and no tokenizer: they are saved into the same folder (the Hugging Face
Trainer does so; by hand, ``model.config.save_pretrained(folder)`` and
``tokenizer.save_pretrained(folder)``).

Loading: the model is built from ``config.json`` with its parameters on the meta device (no
memory), DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reassembles the partitions
(lazily for ZeRO-3: one parameter at a time is made whole), and each whole tensor becomes the model's
parameter as it is (``load_state_dict(assign=True)``): no random initialisation and no copy into
it, so once loaded the host holds one copy of the weights (about two at the peak while DeepSpeed
reads the files). Tied weights (an unembedding that shares the embedding) are tied again afterwards, as
``from_pretrained`` ties them.

The rank files are pickles. DeepSpeed reads them with torch's full unpickler, which runs any
code a file names; before that, each file is opened with torch's ``weights_only`` loader, which
admits only tensors, plain containers and the few plain-data classes of DeepSpeed's own
listed in :data:`_DEEPSPEED_DATA_CLASSES`. A file that holds anything else is refused unless
``model.trust_remote_code=true``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from attribution.errors import one_line
from attribution.models import ModelError, empty_model

LATEST = "latest"
_DEEPSPEED_LOGGER = "DeepSpeed"
_STEP_FOLDERS = "global_step*"
_RANK_FILES = ("*_model_states.pt", "*_optim_states.pt")
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# Qualified names of the classes DeepSpeed pickles into its rank files (loss scalers, the ZeRO
# stage enum, the bf16/ZeRO-1/2 parameter-fragment map); each holds only numbers and names.
_DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
# What a corrupt, truncated or foreign rank file raises in torch.load or in DeepSpeed's reader.
_UNREADABLE = (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError)


def has_weight_files(directory: Path) -> bool:
    """The folder has a weights file that ``from_pretrained`` reads (safetensors or .bin, sharded or not)."""
    return any((directory / name).is_file() for name in _WEIGHT_FILES)


def is_zero_checkpoint(directory: Path) -> bool:
    """A DeepSpeed checkpoint (``latest`` or a ``global_step*`` folder) and no weights file.

    A folder with both, as the Hugging Face Trainer writes with ZeRO-1/2 or with ZeRO-3 and
    ``stage3_gather_16bit_weights_on_model_save``, is loaded from its weights file, as any Hugging Face folder.
    """
    if has_weight_files(directory):
        return False
    return (directory / LATEST).is_file() or any(p.is_dir() for p in directory.glob(_STEP_FOLDERS))


def load_zero_checkpoint(directory: Path, trust_remote_code: bool, dtype: torch.dtype) -> PreTrainedModel:
    """The model of ``config.json`` with the consolidated fp32 master weights of the newest checkpoint, cast to ``dtype``."""
    with _deepspeed_logger_muted():
        deepspeed_api = _consolidation_api(directory)
        folder = directory / checkpoint_tag(directory)
        files = rank_files(folder)
        if not trust_remote_code:
            for file in files:
                _check_weights_only(file)
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
        model = empty_model(config, trust_remote_code, dtype)
        try:
            # Its prints and tqdm bars too (after the import, whose log handler keeps the stdout it finds).
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                lazy = deepspeed_api(str(directory), tag=folder.name, lazy_mode=True)
        except _UNREADABLE as error:
            raise ModelError(f"model directory {directory}: cannot consolidate the DeepSpeed checkpoint {folder}: "
                             f"{one_line(str(error))}") from error
    _assign(model, lazy, folder)
    return model


def checkpoint_tag(directory: Path) -> str:
    """The tag in ``latest``: DeepSpeed writes it once every rank has saved, so it names a complete checkpoint."""
    latest = directory / LATEST
    steps = sorted(p.name for p in directory.glob(_STEP_FOLDERS) if p.is_dir())
    if not latest.is_file():
        raise ModelError(
            f"model directory {directory}: DeepSpeed checkpoint without a '{LATEST}' file (DeepSpeed writes it once every "
            f"rank has saved; folders there: {', '.join(steps)}); if one of them is complete, write its name into {latest}"
        )
    tag = latest.read_text().strip()
    if not tag or not (directory / tag).is_dir():
        raise ModelError(f"model directory {directory}: {latest} names checkpoint {tag!r}, but there is no folder "
                         f"{directory / tag} (folders there: {', '.join(steps) or 'none'})")
    return tag


def rank_files(folder: Path) -> list[Path]:
    """Every rank's model-state and optimizer-state files in a checkpoint folder; both kinds must be there."""
    files = []
    for pattern in _RANK_FILES:
        found = sorted(folder.glob(pattern))
        if not found:
            raise ModelError(f"DeepSpeed checkpoint {folder} has no {pattern} file: it is not a complete ZeRO checkpoint")
        files += found
    return files


@contextlib.contextmanager
def _deepspeed_logger_muted() -> Iterator[None]:
    """DeepSpeed's log while it reads a checkpoint (on a machine without a GPU, a warning that it falls back
    to the CPU, in every process that loads the model); what goes wrong reaches the user as an exception."""
    logger = logging.getLogger(_DEEPSPEED_LOGGER)
    logger.addFilter(_drop)
    try:
        yield
    finally:
        logger.removeFilter(_drop)


def _drop(record: logging.LogRecord) -> bool:
    return False


def _consolidation_api(directory: Path) -> Any:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise ModelError(f"model directory {directory} is a DeepSpeed ZeRO checkpoint; reading it needs DeepSpeed: "
                         "pip install 'attribution[deepspeed]' (with DS_BUILD_OPS=0 on a machine without CUDA)") from error
    return get_fp32_state_dict_from_zero_checkpoint


def _deepspeed_data_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _check_weights_only(file: Path) -> None:
    """Open ``file`` with torch's ``weights_only`` unpickler (tensors memory-mapped, not read), as DeepSpeed cannot."""
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        others = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(file)
                  if name not in _DEEPSPEED_DATA_CLASSES]
        if not others:  # not a foreign class: the file itself is broken
            raise ModelError(f"DeepSpeed checkpoint file {file} cannot be read: {one_line(str(error))}") from error
        raise ModelError(
            f"DeepSpeed checkpoint file {file} holds pickled Python objects ({', '.join(others)}) that torch's weights_only "
            "loader refuses; DeepSpeed reads the file with full pickle, which can run any code: only for a checkpoint you "
            "trust, set model.trust_remote_code=true"
        ) from error
    except _UNREADABLE as error:
        raise ModelError(f"DeepSpeed checkpoint file {file} cannot be read: {one_line(str(error))}") from error


def _assign(model: PreTrainedModel, lazy: dict[str, Any], folder: Path) -> None:
    """Make each consolidated tensor whole, cast it to its parameter's dtype, and make it the parameter.

    Shapes are checked against ``config.json``'s model before any tensor is made whole. Entries
    that share one tensor (tied weights) are made whole once.
    """
    expected = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    for name, value in lazy.items():
        if name not in expected:
            raise ModelError(f"DeepSpeed checkpoint {folder} holds {name}, which the model of config.json does not have: "
                             "the checkpoint is of another architecture")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ModelError(f"DeepSpeed checkpoint {folder} holds {name} of shape {tuple(value.shape)}, but config.json "
                             f"makes it {tuple(expected[name].shape)}: the checkpoint is of another model size")
    whole: dict[int, torch.Tensor] = {}
    state = {}
    for name, value in lazy.items():
        if id(value) not in whole:
            # GatheredTensor.contiguous() concatenates this parameter's pieces from every rank's partition.
            whole[id(value)] = value.contiguous().to(expected[name].dtype)
        state[name] = whole[id(value)]
    loaded = model.load_state_dict(state, strict=False, assign=True)
    # As from_pretrained ties: a tied weight the checkpoint lacks becomes its partner (ZeRO saves a tied pair
    # once); a pair it holds with different values stays untied.
    model.tie_weights(missing_keys=set(loaded.missing_keys), recompute_mapping=False)
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"DeepSpeed checkpoint {folder} has no {missing[0]}{more}, which the model of config.json needs")
