"""What a sweep table is a table *of*: model, factors, standing queries and the settings that shape rows.

Rows from different identities cannot be merged into one top-k (their scores are different
functions), so a change of any of these starts a fresh table. Fingerprints:

- model: the canonical :func:`attribution.models.model_fingerprint` (config + all weights).
  With a factor store it is read from the store's manifest, which scoring checks against
  the loaded model anyway; only ``factors.strategy=identity`` (no store) loads the model here.
- factors: sha256 of the store's ``manifest.json`` (which records when and on what it was
  fitted) and the names and sizes of its files; a refit changes it.
- queries: sha256 of the query files' content.
- settings: the score-shaping settings, by value (so the message can say which one changed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from attribution.curvature.store import read_manifest, store_fingerprint
from attribution.data.corpus import list_shards
from attribution.errors import UserError
from attribution.models import load_model, model_fingerprint
from attribution.prefilter.manifest import shard_fingerprint
from attribution.settings import (
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    torch_dtype,
)

# Fields that do not change which rows a table holds: locations (content is fingerprinted
# instead), devices, batch sizes (float summation order only) and progress bars.
_NOT_IDENTITY = {
    "model": {"path", "device"},
    "data": {"path", "batch_size"},
    "factors": {"path", "max_sequences", "seed", "fisher"},
    "score": {"query_batch_size", "progress"},
    "prefilter": {"path", "device", "batch_size"},
}


class IdentityError(UserError, ValueError):
    """A model, factor store or query file the sweep cannot fingerprint."""


def _model_and_factors(model: ModelSettings, model_path: str, factors: FactorSettings, store: str | None) -> tuple[str, str]:
    if factors.strategy == "identity":
        loaded, _ = load_model(model_path, model.trust_remote_code, torch_dtype(model.dtype), "cpu")
        return model_fingerprint(loaded), "identity"
    if store is None:
        raise IdentityError("factors.path is unset")
    factor_fingerprint = store_fingerprint(store)
    return read_manifest(store).model_fingerprint, factor_fingerprint


def queries_fingerprint(queries: QuerySettings) -> str:
    if queries.path is None:
        raise IdentityError("queries.path is unset")
    digest = hashlib.sha256()
    for path in list_shards(queries.path):
        digest.update(shard_fingerprint(path).encode())
    return digest.hexdigest()[:32]


def settings_identity(**groups: Any) -> dict[str, dict[str, Any]]:
    """Each settings dataclass (or dict) by value, without the fields listed in ``_NOT_IDENTITY``."""
    result = {}
    for name, settings in groups.items():
        values = settings if isinstance(settings, dict) else asdict(settings)
        result[name] = {key: value for key, value in values.items() if key not in _NOT_IDENTITY.get(name, set())}
    return result


def table_identity(
    model: ModelSettings,
    data: DataSettings,
    factors: FactorSettings,
    queries: QuerySettings,
    score: ScoreSettings,
    finetune: FinetuneSettings,
    prefilter: PrefilterSettings,
    refine: RefineSettings = RefineSettings(),
) -> dict[str, Any]:
    """The fingerprints that define one sweep table; ``factors.path`` must already be resolved."""
    if model.path is None:
        raise IdentityError("model.path is unset")
    identity: dict[str, Any] = {}
    identity["model"], identity["factors"] = _model_and_factors(model, model.path, factors, factors.path)
    if finetune.enabled:
        assert finetune.model_path is not None
        identity["finetune_model"], identity["finetune_factors"] = _model_and_factors(
            model, finetune.model_path, factors, finetune.factors_path)
    identity["queries"] = queries_fingerprint(queries)
    identity["settings"] = settings_identity(model=model, data=data, factors=factors, score=score, prefilter=prefilter,
                                             refine=refine,
                                             # Its paths are fingerprinted by content above.
                                             finetune={"damping": finetune.damping})
    # As it will read back from the state file (tuples become lists), so the two compare equal.
    return json.loads(json.dumps(identity))


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities, e.g. ``model a1b2 -> c3d4``, ``score.top_k 10 -> 20``."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key == "settings":
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key} fingerprint {old.get(key)} -> {new.get(key)}")
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for group in sorted(set(old_settings) | set(new_settings)):
        before, after = old_settings.get(group, {}), new_settings.get(group, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{group}.{key} {before.get(key)!r} -> {after.get(key)!r}")
    return changes
