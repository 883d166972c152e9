"""Model loading, tracked-module discovery and the fingerprint."""

from __future__ import annotations

import pytest
import torch

from attribution.models import ModelError, find_tracked_modules, load_model, model_fingerprint
from tests.tiny import tiny_model

EXPECTED_PER_BLOCK = {
    "gpt_neox": (["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], 2),
    "gpt2": (["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], 2),
    "llama": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], 3),
    "bloom": (["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], 2),
}


def test_tracked_modules_are_the_block_linears(architecture):
    model = tiny_model(architecture)
    suffixes, num_mlp = EXPECTED_PER_BLOCK[architecture]
    tracked = find_tracked_modules(model, "all")
    assert len(tracked) == 2 * len(suffixes)
    for block in range(2):
        block_names = [m.name for m in tracked if f".{block}." in m.name]
        assert [n.split(f".{block}.", 1)[1] for n in block_names] == suffixes
    assert all("embed" not in m.name and "lm_head" not in m.name for m in tracked)
    assert len(find_tracked_modules(model, "mlp")) == 2 * num_mlp
    assert [m.name for m in find_tracked_modules(model, r"\.1\..*mlp")] == [m.name for m in tracked if ".1." in m.name and ".mlp." in m.name]


def test_weight_gradient_layout_matches_linear_convention():
    """GPT-2's Conv1D gradient is transposed into (d_out, d_in') with the bias as last column."""
    model = tiny_model("gpt2")
    module = find_tracked_modules(model)[0]
    inputs = torch.randn(5, module.d_in, dtype=torch.float64)
    model.zero_grad()
    module.module(inputs).sum().backward()
    expected = torch.cat([torch.ones(module.d_out, 1, dtype=torch.float64) * inputs.sum(0), torch.full((module.d_out, 1), 5.0, dtype=torch.float64)], 1)
    torch.testing.assert_close(module.weight_gradient(), expected)


def test_selection_errors():
    model = tiny_model("gpt_neox")
    with pytest.raises(ModelError, match="matches no linear module"):
        find_tracked_modules(model, "no_such_module")
    with pytest.raises(ModelError, match="not a valid regular expression"):
        find_tracked_modules(model, "(")


def test_fingerprint_covers_config_and_every_weight():
    model = tiny_model("gpt_neox")
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_model("gpt_neox")) == before
    assert model_fingerprint(tiny_model("gpt_neox", seed=1)) != before
    for parameter in (model.get_input_embeddings().weight, find_tracked_modules(model)[-1].module.weight):
        with torch.no_grad():
            parameter[0, 0] += 1e-3
        assert model_fingerprint(model) != before
        before = model_fingerprint(model)


def test_load_model_errors_name_the_directory(tmp_path):
    with pytest.raises(ModelError, match=f"model directory {tmp_path / 'missing'} does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tmp_path)
