"""Loading a model straight into its FSDP2 shards equals loading it whole and sharding it.

Two processes (gloo, loopback), tiny models saved as real ones: GPT-NeoX with its own
unembedding, Llama with the unembedding tied to the embedding and grouped-query attention
(saved as a sharded safetensors index), a NaN weight, and a ``pytorch_model.bin`` (loaded whole).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

WORLD_SIZE = 2
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn near the river"]


def _save(directory: Path, config, **save: object) -> Path:
    """A random model of ``config`` and a word-level tokenizer, saved with ``save_pretrained``."""
    from attribution.demo.train import build_tokenizer

    tokenizer = build_tokenizer(TEXTS)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, **save)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded_load")
    neox = GPTNeoXConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=32, tie_word_embeddings=False)
    llama = LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=12, max_position_embeddings=32, tie_word_embeddings=True)
    directories = {"gpt_neox": _save(root / "gpt_neox", neox), "llama": _save(root / "llama", llama, max_shard_size="2KB")}
    directories["nan"] = _with_nan(directories["gpt_neox"], root / "nan")
    directories["bin"] = _as_bin(directories["gpt_neox"], root / "bin")
    return directories


def _with_nan(source: Path, directory: Path) -> Path:
    """A copy of ``source`` with one NaN in a block's weight."""
    from safetensors.torch import load_file, save_file

    _copy_beside_weights(source, directory)
    weights = load_file(source / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][3, 2] = float("nan")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _as_bin(source: Path, directory: Path) -> Path:
    """A copy of ``source`` whose weights are a pickled ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    _copy_beside_weights(source, directory)
    torch.save(load_file(source / "model.safetensors"), directory / "pytorch_model.bin")
    return directory


def _copy_beside_weights(source: Path, directory: Path) -> None:
    directory.mkdir()
    for file in source.iterdir():
        if not file.name.startswith("model.safetensors"):
            (directory / file.name).write_bytes(file.read_bytes())


def test_sharded_load_equals_whole_load(models):
    """Every parameter, buffer, logit and the fingerprint equal the whole load's; each rank holds about half."""
    from attribution.distributed.cluster import listening_socket

    listener = listening_socket("127.0.0.1")
    mp.spawn(_worker, args=(listener, listener.getsockname()[1], {k: str(v) for k, v in models.items()}), nprocs=WORLD_SIZE)


def _worker(rank: int, listener: socket.socket, port: int, models: dict[str, str]) -> None:
    import torch.distributed as dist

    from attribution.distributed.cluster import init_process_group

    torch.set_num_threads(1)
    if rank != 0:
        listener.close()
    init_process_group(rank, WORLD_SIZE, "127.0.0.1", port, listener if rank == 0 else None, use_gpu=False)
    try:
        for name in ("gpt_neox", "llama", "bin"):
            _check_equal_to_whole(models[name], streamed=name != "bin")
        _check_nan_refused(models["nan"])
    finally:
        dist.destroy_process_group()


def _check_equal_to_whole(directory: str, streamed: bool) -> None:
    from attribution.distributed.sharded_load import load_sharded_model
    from attribution.models import load_model, model_fingerprint

    whole, _ = load_model(directory)
    loaded = load_sharded_model(directory, False, torch.float32, "cpu")
    assert loaded.streamed is streamed, directory
    assert not loaded.model.training
    assert loaded.fingerprint == model_fingerprint(whole)
    sharded = dict(loaded.model.named_parameters())
    assert list(sharded) == [name for name, _ in whole.named_parameters()]
    for name, parameter in whole.named_parameters():
        assert torch.equal(sharded[name].full_tensor(), parameter), name
    buffers = dict(loaded.model.named_buffers())
    assert list(buffers) == [name for name, _ in whole.named_buffers()]
    for name, buffer in whole.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    if whole.config.tie_word_embeddings:
        assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    held = sum(parameter.to_local().numel() for parameter in sharded.values())
    assert held <= 0.6 * sum(parameter.numel() for parameter in whole.parameters())
    ids = torch.randint(0, whole.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def _check_nan_refused(directory: str) -> None:
    from attribution.curvature.finite import NonFiniteError, check_parameters
    from attribution.distributed.sharded_load import load_sharded_model
    from attribution.models import load_model

    with pytest.raises(NonFiniteError) as whole:
        check_parameters(load_model(directory)[0], f"model.path={directory}")
    with pytest.raises(NonFiniteError) as sharded:
        load_sharded_model(directory, False, torch.float32, "cpu")
    assert str(sharded.value) == str(whole.value)
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h.weight has 1 non-finite" in str(sharded.value)
