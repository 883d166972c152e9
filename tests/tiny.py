"""Tiny causal LMs of each supported architecture, built from a config (no hub), and batches for them."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
)

from attribution.data.batching import TokenBatch

VOCAB = 37


def tiny_config(architecture: str) -> PretrainedConfig:
    """Two blocks, width 8-16: dense Gauss-Newton matrices of a module stay a few hundred wide."""
    if architecture == "gpt_neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=16, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=32,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if architecture == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=12, max_position_embeddings=32)
    if architecture == "bloom":
        return BloomConfig(vocab_size=VOCAB, hidden_size=8, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0)
    raise ValueError(architecture)


ARCHITECTURES = ("gpt_neox", "gpt2", "llama", "bloom")
# Mixture-of-experts LMs (fused experts): Mixtral; Qwen2-MoE adds a shared expert that sees every
# token; gpt-oss stores its experts transposed, with biases, gate and up interleaved.
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "gpt_oss")


def tiny_moe_config(architecture: str = "mixtral", vocab_size: int = VOCAB, hidden_size: int = 16, intermediate_size: int = 12,
                    num_layers: int = 2, num_experts: int = 4, top_k: int = 2) -> PretrainedConfig:
    """Every block a mixture of ``num_experts`` experts, ``top_k`` per token (and attention)."""
    shared = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 2,
              "num_key_value_heads": 1, "num_experts_per_tok": top_k, "max_position_embeddings": 64}
    if architecture == "mixtral":
        return MixtralConfig(**shared, intermediate_size=intermediate_size, num_local_experts=num_experts)
    if architecture == "qwen2_moe":
        return Qwen2MoeConfig(**shared, moe_intermediate_size=intermediate_size, shared_expert_intermediate_size=intermediate_size,
                              num_experts=num_experts, decoder_sparse_step=1, mlp_only_layers=[])
    if architecture == "gpt_oss":
        return GptOssConfig(**shared, head_dim=hidden_size // 2, intermediate_size=intermediate_size, num_local_experts=num_experts,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(architecture)


def tiny_model(architecture: str = "gpt_neox", seed: int = 0, dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture))
    return model.to(dtype).eval()


def tiny_moe_model(architecture: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(architecture))
    return model.to(dtype).eval()


def make_batch(sequences: list[list[int]], ids: list[str] | None = None, pad: int = 0) -> TokenBatch:
    """A right-padded document batch: every token but the first is a target."""
    ids = ids or [f"doc-{i}" for i in range(len(sequences))]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    target_mask = attention_mask.bool().clone()
    target_mask[:, 0] = False
    return TokenBatch(
        ids=list(ids),
        shards=["memory"] * len(sequences),
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_mask=target_mask,
        truncated=[False] * len(sequences),
    )


def random_sequences(count: int, seed: int = 0, min_length: int = 3, max_length: int = 9) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (count,), generator=generator)
    return [torch.randint(1, VOCAB, (int(n),), generator=generator).tolist() for n in lengths]


def query_batch(prompts: list[list[int]], completions: list[list[int]], ids: list[str] | None = None) -> TokenBatch:
    """A right-padded query batch whose targets are the completion tokens."""
    batch = make_batch([p + c for p, c in zip(prompts, completions)], ids or [f"q-{i}" for i in range(len(prompts))])
    batch.target_mask[:] = False
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        batch.target_mask[row, len(prompt) : len(prompt) + len(completion)] = True
    return batch


def save_tiny_lm(directory, texts: list[str], seed: int = 0):
    """A random tiny GPT-NeoX with a word-level tokenizer over ``texts``, saved like a real model."""
    from attribution.demo.train import build_tokenizer

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_moe_lm(directory, texts: list[str], seed: int = 0, architecture: str = "mixtral", **sizes: int):
    """A random mixture-of-experts LM (Mixtral by default: 4 experts, top-2, two blocks of width 16;
    ``sizes`` are :func:`tiny_moe_config`'s) with a word-level tokenizer over ``texts``, saved like
    a real model; the directory is returned. The benchmark's MoE rehearsal model is built with it."""
    from attribution.demo.train import build_tokenizer

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(architecture, vocab_size=len(tokenizer), **sizes))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
