"""The fit-factors workflow: load the model, stream a corpus sample, fit, write the store and a run record."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attribution.curvature.store import save_factors
from attribution.distributed.fit import fit_on_ray
from attribution.runs import RunRecord
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings
from attribution.store_fit import fit_store


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
    cluster: ClusterSettings = ClusterSettings(num_workers=0),
) -> FitSummary:
    """Fit and save the factor store named by ``factor_settings.path`` (default ``output_dir/factors``).

    With ``cluster.num_workers > 0`` the fit runs on that many Ray workers; this process
    is the one writer of the store.
    """
    record = RunRecord(job="fit_factors", config=config)
    if cluster.uses_ray:
        parts = fit_on_ray(model_settings, data_settings, factor_settings, cluster)
        factors = parts[0].factors
        skips = [skip for part in parts for skip in part.skips]
        record.config["workers"] = [{"peak_memory_mib": round(part.peak_memory_mib, 1),
                                     "parameters_held": part.parameters_held} for part in parts]
    else:
        fit = fit_store(model_settings, data_settings, factor_settings, progress=progress)
        factors, skips = fit.factors, fit.skips
    seconds = record.lap("fit")
    factors_path = save_factors(factors, factor_settings.path or Path(output_dir) / "factors")
    unique_skips = list(dict.fromkeys(skips))
    for skip in unique_skips:
        record.skip(skip)
    record.fingerprints["model"] = factors.manifest.model_fingerprint
    record.counts = {
        "sequences": factors.manifest.num_sequences,
        "tokens": factors.manifest.num_tokens,
        "skipped": len(unique_skips),
        "modules": len(factors.manifest.modules),
        "workers": max(cluster.num_workers, 1),
    }
    record.outputs["factors"] = str(factors_path)
    record.config["resolved_settings"] = {
        "model": asdict(model_settings),
        "data": asdict(data_settings),
        "factors": asdict(factor_settings),
        "cluster": asdict(cluster),
    }
    record_path = record.write(output_dir)
    return FitSummary(factors_path, record_path, factors.manifest.num_sequences, factors.manifest.num_tokens,
                      len(unique_skips), seconds)
