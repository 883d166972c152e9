"""Model loading, tracked-module discovery and the fingerprint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from attribution.models import (
    ModelError,
    check_causal,
    find_tracked_modules,
    load_model,
    model_fingerprint,
)
from tests.tiny import save_tiny_lm, tiny_model

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


def test_a_folder_without_weights_is_refused(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=rf"^model directory {folder} has no weights: no model.safetensors or pytorch_model.bin "
                                         r"\(or their sharded index\), and no DeepSpeed ZeRO checkpoint"):
        load_model(folder)


def test_every_supported_architecture_passes_the_causality_check(architecture):
    check_causal(tiny_model(architecture), "tiny")


def test_an_encoder_loaded_as_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(folder)
    save_tiny_lm(tmp_path / "words", ["a b c"])  # a real vocabulary for the BERT folder
    AutoTokenizer.from_pretrained(tmp_path / "words").save_pretrained(folder)
    with pytest.raises(ModelError, match=rf"model directory {folder}: BertLMHeadModel does not attend causally "
                                         r"\(config.json has is_decoder=false\)"):
        load_model(folder)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    load_model(folder)
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab")):
            file.unlink()
    with pytest.raises(ModelError, match=rf"model directory {folder}: its tokenizer has no vocabulary "
                                         r"\(only \d special tokens; tokenizer files there: none\)"):
        load_model(folder)


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    save_tiny_lm(tmp_path / "big", ["many more words in this other tokenizer than the model embeds"])
    AutoTokenizer.from_pretrained(tmp_path / "big").save_pretrained(folder)
    with pytest.raises(ModelError, match="the tokenizer does not belong to this model"):
        load_model(folder)


def test_remote_code_runs_only_when_trusted(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}
    # A class transformers has: its own code is used, the folder's is not run.
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map, "model_type": "custom_lm"}))
    with pytest.raises(ModelError, match=r"needs its own Python code .*it runs only with model.trust_remote_code=true"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config.json is not readable JSON"):
        load_model(folder)


def test_no_tracked_module_names_the_model(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    model, _ = load_model(folder)
    with pytest.raises(ModelError, match=rf"model.tracked_modules='nothing' matches no linear module of {folder}"):
        find_tracked_modules(model, "nothing")
