"""The document sample on which a stage's Gauss-Newton matrix is refined.

By default a stage is refined on the data its factor store was fitted on (the manifest records
the path, the sequence length and the objective), so the refined inverse and the closed form it
starts from describe the same curvature; ``refine.data_path`` / ``refine.finetune_data_path``
name another sample. The first ``refine.max_sequences`` items are used, like the fit's sample;
fine-tuning rows (``prompt``/``completion``) keep their objective, ``log p(completion | prompt)``.
"""

from __future__ import annotations

from attribution.curvature.store import Manifest
from attribution.data.bad_input import DataError
from attribution.data.batching import TokenBatch
from attribution.data.corpus import SkipHandler
from attribution.data.discovery import list_shards
from attribution.data.stream import training_batches
from attribution.settings import DataSettings, SettingsError


def sample_path(explicit: str | None, manifest: Manifest, key: str) -> str:
    """``explicit``, else the fit data recorded in ``manifest``; ``key`` names the setting in errors."""
    if explicit is not None:
        return explicit
    recorded = manifest.data.get("path")
    if not recorded:
        raise SettingsError(f"{key} is null and the factor store records no fit data (strategy {manifest.strategy}); "
                            f"set {key} to the documents to refine on")
    try:
        list_shards(recorded)
    except DataError as error:
        raise SettingsError(f"{key} is null and the factor store's fit data cannot be read here ({error}); "
                            f"set {key} to the documents to refine on") from error
    return str(recorded)


def sample_batches(
    tokenizer: object,
    path: str,
    max_length: int,
    batch_size: int,
    max_sequences: int | None,
    on_skip: SkipHandler,
    key: str,
) -> list[TokenBatch]:
    """The first ``max_sequences`` usable items of ``path``, batched; an error naming ``key`` when none is usable."""
    settings = DataSettings(path=path, max_length=max_length, batch_size=batch_size)
    batches = list(training_batches(tokenizer, list_shards(path), settings, on_skip, max_sequences))
    if not batches:
        raise SettingsError(f"{key}={path}: no usable document to refine on (every one was empty, too long or skipped)")
    return batches
