"""The factor store: a directory with ``manifest.json`` and one safetensors file per module.

Written to a temporary sibling directory and renamed into place, so a reader never
sees a half-written store, and never written with a NaN or Inf factor, so a store from an
earlier run stays as it was. Loading checks the model fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attribution import __version__
from attribution.curvature.factors import ModuleFactors, check_strategy
from attribution.curvature.finite import check_factors
from attribution.errors import UserError
from attribution.models import TrackedModule

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COVARIANCES = ("activation_covariance", "gradient_covariance")


class FactorStoreError(UserError, ValueError):
    """A missing, corrupt or mismatched factor store."""


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    d_in: int
    d_out: int
    bias: bool

    @classmethod
    def of(cls, module: TrackedModule) -> ModuleSpec:
        return cls(module.name, module.d_in, module.d_out, module.bias)


@dataclass
class Manifest:
    strategy: str
    fisher: str
    model_fingerprint: str
    modules: list[ModuleSpec]
    num_sequences: int
    num_tokens: int
    data: dict[str, Any]
    dtype: str
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    library_version: str = __version__
    # What it was fitted from (attribution.fitting.fit_request): a store with the same request is reused.
    request: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        return cls(**{**raw, "modules": [ModuleSpec(**m) for m in raw["modules"]]})


@dataclass
class FactorSet:
    """A manifest and the factors of every module it lists."""

    manifest: Manifest
    modules: dict[str, ModuleFactors]


def module_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.safetensors"


def save_factors(factors: FactorSet, path: str | Path) -> Path:
    """Write the store atomically: a temporary sibling directory, then a rename; every factor finite first."""
    target = Path(path)
    check_factors(factors.modules, f"factor store {target} not written")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        for spec in factors.manifest.modules:
            save_file(factors.modules[spec.name].as_dict(), str(module_file(staging, spec.name)))
        (staging / MANIFEST).write_text(json.dumps(asdict(factors.manifest), indent=2) + "\n")
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def store_fingerprint(path: str | Path) -> str:
    """sha256 of the store's manifest (which records when and on what it was fitted) and the names and
    sizes of its files: a refit changes it."""
    directory = Path(path)
    if not (directory / MANIFEST).is_file():
        raise FactorStoreError(f"factor store {directory} does not exist or never finished (no {MANIFEST}); fit it "
                               f"first: python -m jobs.fit_factors factors.path={directory} model.path=... data.path=...")
    digest = hashlib.sha256((directory / MANIFEST).read_bytes())
    for file in sorted(directory.iterdir()):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:32]


def read_manifest(path: str | Path) -> Manifest:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FactorStoreError(f"factor store {path} has no {MANIFEST}: not a factor store, or never finished")
    try:
        manifest = Manifest.from_dict(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise FactorStoreError(f"factor store manifest {manifest_path} is corrupt: {error}") from error
    if manifest.format_version != FORMAT_VERSION:
        raise FactorStoreError(f"factor store {path} has format_version {manifest.format_version}, this library reads {FORMAT_VERSION}")
    check_strategy(manifest.strategy)
    return manifest


def load_factors(
    path: str | Path,
    tracked: list[TrackedModule],
    model_fingerprint: str | None,
    device: torch.device | str = "cpu",
    covariances: bool = True,
) -> FactorSet:
    """Load the factors of the tracked modules, checking the model fingerprint and every shape.

    ``model_fingerprint=None`` skips the fingerprint check; multi-stage scoring uses it to
    read a store of another model, whose identity it checks itself. ``covariances=False`` reads
    only the eigen-form, tensor by tensor, which is all scoring needs.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    stored = {spec.name: spec for spec in manifest.modules}
    # Coverage first: the fingerprint covers the tracked set, and a missing module is the
    # more useful thing to be told.
    for module in tracked:
        spec = stored.get(module.name)
        if spec is None:
            raise FactorStoreError(f"factor store {directory} has no factors for tracked module {module.name}")
        if spec != ModuleSpec.of(module):
            raise FactorStoreError(f"factor store {directory} has module {spec}, but the model has {ModuleSpec.of(module)}")
    if model_fingerprint is not None and manifest.model_fingerprint != model_fingerprint:
        raise FactorStoreError(
            f"factor store {directory} was fitted for model {manifest.model_fingerprint}, "
            f"but the loaded model is {model_fingerprint}"
        )
    modules: dict[str, ModuleFactors] = {}
    for module in tracked:
        file = module_file(directory, module.name)
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as opened:
                names = [name for name in opened.keys() if covariances or name not in COVARIANCES]
                tensors = {name: opened.get_tensor(name) for name in names}
            modules[module.name] = ModuleFactors(**{**dict.fromkeys(COVARIANCES), **tensors})
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise FactorStoreError(f"factor file {file} is missing or corrupt: {error}") from error
        _check_shapes(file, module, modules[module.name])
    manifest.modules = [stored[m.name] for m in tracked]
    return FactorSet(manifest, modules)


def _check_shapes(file: Path, module: TrackedModule, factors: ModuleFactors) -> None:
    d_in, d_out = module.d_in_augmented, module.d_out
    expected = {
        "activation_covariance": (d_in, d_in),
        "gradient_covariance": (d_out, d_out),
        "activation_eigenvectors": (d_in, d_in),
        "gradient_eigenvectors": (d_out, d_out),
        "corrected_eigenvalues": (d_out, d_in),
    }
    present = factors.as_dict()
    for name, shape in expected.items():
        if name not in present:
            if name in COVARIANCES:
                continue
            raise FactorStoreError(f"factor file {file} has no {name}")
        if tuple(present[name].shape) != shape:
            raise FactorStoreError(f"factor file {file}: {name} has shape {tuple(present[name].shape)}, expected {shape}")
