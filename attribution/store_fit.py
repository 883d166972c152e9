"""One worker's share of a factor fit: load the model, stream its share of the sample, fit with the others.

Called once in-process by :func:`attribution.fitting.run_fit`, or by every Ray fit worker
(:mod:`attribution.distributed.fit`), whose covariance and eigenvalue sums are all-reduced.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from attribution.curvature.finite import check_parameters
from attribution.curvature.fit import Collective, FitConfig, SingleProcess, fit_factors
from attribution.curvature.store import FactorSet
from attribution.data.batching import TokenBatch
from attribution.data.corpus import Skip, list_shards
from attribution.data.stream import is_prompt_completion, training_batches
from attribution.distributed.sharded_load import load_worker_model
from attribution.distributed.sharding import parameters_held
from attribution.settings import DataSettings, FactorSettings, ModelSettings, SettingsError, resolve_device, torch_dtype


@dataclass
class StoreFit:
    """One worker's fit: the all-reduced factors, its skips, and the parameter elements it held."""

    factors: FactorSet
    skips: list[Skip]
    parameters_held: int


def fit_store(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    collective: Collective = SingleProcess(),
    progress: bool = True,
    sharding: str = "none",
) -> StoreFit:
    """This worker's part of a fit: its share of the sample, all-reduced with the others.

    ``sharding`` (``fsdp`` or ``deepspeed``) shards the parameters over the collective's process group.
    """
    if model_settings.path is None or data_settings.path is None:
        raise SettingsError("model.path and data.path must be set (the jobs fill them in with the demo)")
    device = resolve_device(model_settings.device)
    loaded, tracked = load_worker_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype),
                                        device, sharding, model_settings.tracked_modules)
    model, tokenizer, fingerprint = loaded.model, loaded.tokenizer, loaded.fingerprint
    if sharding == "none":
        check_parameters(model, f"model.path={model_settings.path}")
    shards = list_shards(data_settings.path)
    skips: list[Skip] = []
    passes = itertools.count()

    def batches() -> Iterator[TokenBatch]:
        # Every pass reads the same sample; its skips are recorded once.
        on_skip = skips.append if next(passes) == 0 else _ignore
        yield from training_batches(tokenizer, shards, data_settings, on_skip, factor_settings.max_sequences,
                                    collective.rank, collective.world_size)

    fit_config = FitConfig(
        strategy=factor_settings.strategy,
        fisher=factor_settings.fisher,
        seed=factor_settings.seed,
        dtype=torch_dtype(factor_settings.dtype),
        progress=progress,
        lockstep=sharding != "none",
    )
    description = {
        "path": str(data_settings.path),
        "objective": "log p(completion | prompt)" if is_prompt_completion(shards) else "log p(z)",
        "shards": [str(s) for s in shards],
        "max_sequences": factor_settings.max_sequences,
        "max_length": data_settings.max_length,
        "seed": factor_settings.seed,
        "workers": collective.world_size,
    }
    factors = fit_factors(model, tracked, batches, fit_config, fingerprint, description, collective)
    return StoreFit(factors, skips, parameters_held(model))


def _ignore(skip: Skip) -> None:
    """Skips of a repeated pass were already recorded by the first."""
