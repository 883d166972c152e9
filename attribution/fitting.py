"""The fit-factors workflow: load the model, stream a corpus sample, fit, write the store and a run record."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attribution.curvature.store import MANIFEST, Manifest, read_manifest, save_factors
from attribution.data.corpus import list_shards
from attribution.distributed.fit import fit_on_ray
from attribution.runs import RunRecord
from attribution.scoring.markers import file_fingerprint
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings, SettingsError
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
        skipped = f"{self.num_skipped} skipped, listed in {self.run_record}" if self.num_skipped else "0 skipped"
        return (
            f"fitted factors on {self.num_sequences} sequences / {self.num_tokens} tokens "
            f"in {self.seconds:.1f} s ({skipped}) -> {self.factors_path}"
        )


def fit_request(model: ModelSettings, data: DataSettings, factors: FactorSettings) -> str:
    """sha256 of everything a fit depends on: the model's and the corpus's files (name, size and
    modification time: a rewritten file counts as changed, without reading gigabytes to hash
    them; scoring checks the weights' own fingerprint anyway) and the settings that shape the
    factors. Devices, batch sizes and worker counts change only the order of float sums, and the
    damping is applied when scoring."""
    if model.path is None or data.path is None:
        raise SettingsError("model.path and data.path must be set (the jobs fill them in with the demo)")
    model_files = sorted(path for path in Path(model.path).rglob("*") if path.is_file())
    payload = {
        "model_files": [file_fingerprint(path) for path in model_files],
        "corpus_files": [file_fingerprint(path) for path in list_shards(data.path)],
        "model": {"tracked_modules": model.tracked_modules, "dtype": model.dtype},
        "data": {key: value for key, value in asdict(data).items() if key not in ("path", "batch_size")},
        "factors": {key: value for key, value in asdict(factors).items() if key not in ("path", "damping")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fitted_for(path: str | Path, request: str) -> Manifest | None:
    """The manifest of the store at ``path`` when it was fitted for ``request``, else None."""
    if not (Path(path) / MANIFEST).is_file():
        return None
    manifest = read_manifest(path)
    return manifest if manifest.request == request else None


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
    # Before the fit: the files as they were read.
    request = fit_request(model_settings, data_settings, factor_settings)
    record = RunRecord(job="fit_factors", config=config)
    if cluster.uses_ray:
        parts = fit_on_ray(model_settings, data_settings, factor_settings, cluster)
        factors = parts[0].factors
        skips = [skip for part in parts for skip in part.skips]
        record.config["workers"] = [{"node": part.node, "peak_memory_mib": round(part.peak_memory_mib, 1),
                                     "parameters_held": part.parameters_held} for part in parts]
    else:
        fit = fit_store(model_settings, data_settings, factor_settings, progress=progress)
        factors, skips = fit.factors, fit.skips
    seconds = record.lap("fit")
    factors.manifest.request = request
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
