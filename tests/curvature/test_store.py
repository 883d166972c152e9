"""The factor store: round trip, atomic replacement, and every way a store can be wrong."""

from __future__ import annotations

import json

import pytest
import torch

from attribution.curvature.store import FactorStoreError, load_factors, read_manifest, save_factors
from attribution.models import find_tracked_modules
from tests.curvature.test_fit import fit
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model_and_factors():
    model = tiny_model("gpt2")
    return model, fit(model)


def test_round_trip_is_exact(tmp_path, model_and_factors):
    model, factors = model_and_factors
    path = save_factors(factors, tmp_path / "store")
    loaded = load_factors(path, find_tracked_modules(model), "test")
    assert [m.name for m in loaded.manifest.modules] == [m.name for m in factors.manifest.modules]
    for name, module in factors.modules.items():
        for key, tensor in module.as_dict().items():
            assert torch.equal(loaded.modules[name].as_dict()[key], tensor), (name, key)
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"format_version", "strategy", "fisher", "model_fingerprint", "modules", "num_sequences",
            "num_tokens", "data", "created", "library_version"} <= manifest.keys()
    assert manifest["modules"][0] == {"name": "transformer.h.0.attn.c_attn", "d_in": 8, "d_out": 24, "bias": True}
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["manifest.json"] + [f"{m.name}.safetensors" for m in factors.manifest.modules])


def test_overwrite_replaces_atomically(tmp_path, model_and_factors):
    _, factors = model_and_factors
    save_factors(factors, tmp_path / "store")
    save_factors(factors, tmp_path / "store")
    assert [p.name for p in tmp_path.iterdir()] == ["store"], "no staging or retired directory left behind"


def test_fingerprint_mismatch_names_both(tmp_path, model_and_factors):
    model, factors = model_and_factors
    save_factors(factors, tmp_path / "store")
    with pytest.raises(FactorStoreError, match="fitted for model test, but the loaded model is other"):
        load_factors(tmp_path / "store", find_tracked_modules(model), "other")


def test_store_missing_a_tracked_module(tmp_path, model_and_factors):
    model, factors = model_and_factors
    save_factors(factors, tmp_path / "store")
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())
    manifest["modules"] = manifest["modules"][1:]
    (tmp_path / "store/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FactorStoreError, match="no factors for tracked module transformer.h.0.attn.c_attn"):
        load_factors(tmp_path / "store", find_tracked_modules(model), "test")


def test_corrupt_module_file_and_missing_manifest(tmp_path, model_and_factors):
    model, factors = model_and_factors
    save_factors(factors, tmp_path / "store")
    (tmp_path / "store/transformer.h.1.mlp.c_fc.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FactorStoreError, match="transformer.h.1.mlp.c_fc.safetensors is missing or corrupt"):
        load_factors(tmp_path / "store", find_tracked_modules(model), "test")
    with pytest.raises(FactorStoreError, match="has no manifest.json"):
        read_manifest(tmp_path)


def test_store_of_another_architecture(tmp_path, model_and_factors):
    _, factors = model_and_factors
    save_factors(factors, tmp_path / "store")
    other = tiny_model("gpt_neox")
    with pytest.raises(FactorStoreError, match="no factors for tracked module gpt_neox.layers.0"):
        load_factors(tmp_path / "store", find_tracked_modules(other), None)
