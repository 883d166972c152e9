"""The fit-factors workflow: load the model, stream a corpus sample, fit, write the store and a run record."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.store import save_factors
from attribution.data.batching import TokenBatch
from attribution.data.corpus import Skip, list_shards
from attribution.data.stream import is_prompt_completion, training_batches
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.runs import RunRecord
from attribution.settings import DataSettings, FactorSettings, ModelSettings, SettingsError, resolve_device, torch_dtype


@dataclass(frozen=True)
class FitSummary:
    factors_path: Path
    run_record: Path
    num_sequences: int
    num_tokens: int
    num_skipped: int
    seconds: float

    def line(self) -> str:
        return (
            f"fitted factors on {self.num_sequences} sequences / {self.num_tokens} tokens "
            f"in {self.seconds:.1f} s ({self.num_skipped} skipped) -> {self.factors_path}"
        )


def run_fit(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    progress: bool = True,
) -> FitSummary:
    """Fit and save the factor store named by ``factor_settings.path`` (default ``output_dir/factors``)."""
    if model_settings.path is None or data_settings.path is None:
        raise SettingsError("model.path and data.path must be set (the jobs fill them in with the demo)")
    record = RunRecord(job="fit_factors", config=config)
    device = resolve_device(model_settings.device)
    model, tokenizer = load_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype), device)
    tracked = find_tracked_modules(model, model_settings.tracked_modules)
    fingerprint = model_fingerprint(model)
    record.fingerprints["model"] = fingerprint
    shards = list_shards(data_settings.path)
    skips: list[Skip] = []
    passes = itertools.count()

    def batches() -> Iterator[TokenBatch]:
        # Every pass reads the same sample; its skips are recorded once.
        first_pass = next(passes) == 0
        on_skip = skips.append if first_pass else _ignore
        yield from training_batches(tokenizer, shards, data_settings, on_skip, limit=factor_settings.max_sequences)

    fit_config = FitConfig(
        strategy=factor_settings.strategy,
        fisher=factor_settings.fisher,
        seed=factor_settings.seed,
        dtype=torch_dtype(factor_settings.dtype),
        progress=progress,
    )
    description = {
        "path": str(data_settings.path),
        "objective": "log p(completion | prompt)" if is_prompt_completion(shards) else "log p(z)",
        "shards": [str(s) for s in shards],
        "max_sequences": factor_settings.max_sequences,
        "max_length": data_settings.max_length,
        "seed": factor_settings.seed,
    }
    factors = fit_factors(model, tracked, batches, fit_config, fingerprint, description)
    seconds = record.lap("fit")
    factors_path = save_factors(factors, factor_settings.path or Path(output_dir) / "factors")
    for skip in skips:
        record.skip(skip)
    record.counts = {
        "sequences": factors.manifest.num_sequences,
        "tokens": factors.manifest.num_tokens,
        "skipped": len(skips),
        "modules": len(tracked),
    }
    record.outputs["factors"] = str(factors_path)
    record.config["resolved_settings"] = {
        "model": asdict(model_settings),
        "data": asdict(data_settings),
        "factors": asdict(factor_settings),
    }
    record_path = record.write(output_dir)
    return FitSummary(factors_path, record_path, factors.manifest.num_sequences, factors.manifest.num_tokens, len(skips), seconds)


def _ignore(skip: Skip) -> None:
    """Skips of a repeated pass were already recorded by the first."""
