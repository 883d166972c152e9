"""Rehearsal models: real widths, few blocks, random weights, built from a config (nothing downloaded).

Time and memory of every stage depend on the shapes alone (widths, vocabulary, sequence length,
batch), not on what the weights have learnt, so a model at a real model's widths with one or two
of its blocks measures what a block costs; the memory model multiplies it out to the whole depth
(:mod:`attribution.scale.memory_model`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from attribution.errors import UserError

PAD, UNK = "<pad>", "<unk>"
WORDS = 4096


@dataclass(frozen=True)
class Rehearsal:
    """A named rehearsal: the real model it stands for and the config that builds its blocks."""

    name: str
    stands_for: str
    full_layers: int
    config: PretrainedConfig


def _llama(layers: int, hidden: int, mlp: int, heads: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128_256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                       tie_word_embeddings=False, rope_theta=500_000.0)


REHEARSALS: dict[str, Rehearsal] = {
    "pythia-160m": Rehearsal("pythia-160m", "EleutherAI Pythia-160M, whole", 12, GPTNeoXConfig(
        vocab_size=50_304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0)),
    "llama-1b-block": Rehearsal("llama-1b-block", "Llama-3.2-1B widths (2,048 / 8,192, 32/8 heads), 1 of 16 blocks", 16,
                                _llama(1, 2048, 8192, 32, 8)),
    "llama-8b-blocks": Rehearsal("llama-8b-blocks", "Llama-3-8B widths (4,096 / 14,336, 32/8 heads), 2 of 32 blocks", 32,
                                 _llama(2, 4096, 14336, 32, 8)),
    "tiny-neox": Rehearsal("tiny-neox", "no real model: a 2-block GPT-NeoX at 64 / 256, for tests", 2, GPTNeoXConfig(
        vocab_size=WORDS + 2, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0)),
    "mixtral-small": Rehearsal("mixtral-small", "a Mixtral-style MoE (8 experts, top-2) at 1,024 / 3,584, 2 blocks", 2,
                               MixtralConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
                                             num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                             num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False)),
}


def rehearsal(name: str) -> Rehearsal:
    if name not in REHEARSALS:
        raise UserError(f"scale.models: unknown rehearsal model {name!r}; known: {', '.join(REHEARSALS)}")
    return REHEARSALS[name]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``WORDS`` synthetic words: one token per word, so a document of
    n words is n tokens. Its ids are a prefix of any rehearsal vocabulary."""
    vocabulary = {PAD: 0, UNK: 1} | {f"w{i}": i + 2 for i in range(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, padding_side="right")


def words(count: int, generator: random.Random) -> str:
    return " ".join(f"w{generator.randrange(WORDS)}" for _ in range(count))


def build_model_directory(name: str, directory: Path, seed: int = 0) -> Path:
    """Save rehearsal ``name`` (random weights, float32) and its tokenizer to ``directory``, once."""
    spec = rehearsal(name)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(spec.config, dtype=torch.float32)
    staging = directory.with_name(directory.name + ".partial")
    model.save_pretrained(staging)
    word_tokenizer().save_pretrained(staging)
    staging.rename(directory)
    return directory


def write_corpus(path: Path, documents: int, tokens: int, seed: int = 0) -> Path:
    """``documents`` JSON Lines documents of exactly ``tokens`` words."""
    generator = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for index in range(documents):
            out.write(json.dumps({"id": f"doc-{index}", "text": words(tokens, generator)}) + "\n")
    return path


def write_queries(path: Path, queries: int, prompt_tokens: int, completion_tokens: int, seed: int = 1) -> Path:
    generator = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for index in range(queries):
            out.write(json.dumps({"id": f"q-{index}", "prompt": words(prompt_tokens, generator),
                                  "completion": " " + words(completion_tokens, generator)}) + "\n")
    return path
