"""Tests for tokenization, batching and sequence log-probabilities."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from attribution.data import (
    Document,
    Query,
    Skip,
    TokenBatch,
    batch_documents,
    batch_queries,
    pad_id,
    sequence_log_prob,
)

SENTENCES = [
    "hello world",
    "the world is round",
    "hello there world",
    "worlds apart",
    "the cat sat on the mat",
]
BOS, UNK = 1, 0


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer that prepends BOS and has no pad token."""
    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: no BOS, no pad, merges across word pieces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(byte_tokenizer) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(byte_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config).eval()


def docs(*texts: str) -> list[Document]:
    return [Document(f"d{i}", text, "shard.jsonl", i) for i, text in enumerate(texts)]


def collect_documents(tokenizer, documents, batch_size=8, max_length=16):
    skips: list[Skip] = []
    batches = list(batch_documents(tokenizer, documents, batch_size, max_length, on_skip=skips.append))
    return batches, skips


def collect_queries(tokenizer, queries, batch_size=8, max_length=16):
    skips: list[Skip] = []
    batches = list(batch_queries(tokenizer, queries, batch_size, max_length, on_skip=skips.append))
    return batches, skips


def hand_log_probs(logits: torch.Tensor, batch: TokenBatch) -> list[float]:
    """Reference: one position at a time, in float64."""
    totals = []
    for b in range(batch.input_ids.shape[0]):
        total = 0.0
        for t in range(1, batch.input_ids.shape[1]):
            if batch.target_mask[b, t]:
                log_probs = logits[b, t - 1].double().log_softmax(-1)
                total += float(log_probs[batch.input_ids[b, t]])
        totals.append(total)
    return totals


# --- pad_id ------------------------------------------------------------------


def test_pad_id_falls_back_to_eos_then_zero(word_tokenizer):
    assert pad_id(word_tokenizer) == word_tokenizer.eos_token_id == 2
    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


# --- documents ---------------------------------------------------------------


def test_document_batches_pad_to_longest_and_target_all_but_first(word_tokenizer):
    [batch], skips = collect_documents(word_tokenizer, docs("hello world", "the world is round"))
    assert skips == []
    assert batch.ids == ["d0", "d1"]
    assert batch.shards == ["shard.jsonl", "shard.jsonl"]
    assert batch.input_ids.shape == (2, 5)  # BOS + 4 words, not max_length
    assert batch.input_ids[0].tolist()[3:] == [2, 2]  # padded with EOS: no pad token
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.target_mask.tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, True],
    ]
    assert batch.input_ids.dtype == torch.long and batch.target_mask.dtype == torch.bool
    assert batch.truncated == [False, False]
    assert batch.num_tokens == 8


def test_documents_batched_in_order(word_tokenizer):
    texts = [f"hello {'world ' * i}" for i in range(1, 6)]
    batches, _ = collect_documents(word_tokenizer, docs(*texts), batch_size=2)
    assert [b.ids for b in batches] == [["d0", "d1"], ["d2", "d3"], ["d4"]]


def test_long_documents_are_truncated_and_flagged(word_tokenizer):
    # max_length 4: "hello world" is BOS + 2 = 3 tokens; the exact fit (4) is not truncated.
    documents = docs("hello world", "the world is", "the world is round", "the cat sat on the mat")
    [batch], skips = collect_documents(word_tokenizer, documents, max_length=4)
    assert skips == []
    assert batch.truncated == [False, False, True, True]
    assert batch.input_ids.shape == (4, 4)
    assert batch.input_ids[2].tolist() == word_tokenizer("the world is")["input_ids"]
    assert batch.target_mask[3].tolist() == [False, True, True, True]


def test_documents_with_fewer_than_two_tokens_are_skipped(byte_tokenizer):
    # "h" is one byte-level token and this tokenizer adds no BOS.
    batches, skips = collect_documents(byte_tokenizer, docs("h", "hello world"), batch_size=1)
    assert [b.ids for b in batches] == [["d1"]]
    assert skips == [Skip("d0", "shard.jsonl", 0, "fewer than two tokens")]


def test_sizes_are_checked(word_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        collect_documents(word_tokenizer, docs("hello world"), max_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        collect_queries(word_tokenizer, [], batch_size=0)


# --- queries -----------------------------------------------------------------


def test_query_targets_are_the_completion(word_tokenizer):
    queries = [Query("q0", "the world", "is round"), Query("q1", "hello", "there")]
    [batch], _ = collect_queries(word_tokenizer, queries)
    assert batch.ids == ["q0", "q1"]
    assert batch.input_ids[0].tolist() == word_tokenizer("the world is round")["input_ids"]
    assert batch.target_mask.tolist() == [
        [False, False, False, True, True],
        [False, False, True, False, False],
    ]
    assert batch.truncated == [False, False]


def test_completion_boundary_is_exact_when_bpe_would_merge_across_it(byte_tokenizer):
    prompt, completion = "hello wor", "ld"
    joint = byte_tokenizer(prompt + completion)["input_ids"]
    separate = byte_tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert joint[-len(separate):] != separate  # the joint tokenization merges "wor" + "ld"
    [batch], _ = collect_queries(byte_tokenizer, [Query("q", prompt, completion)])
    targets = batch.input_ids[0][batch.target_mask[0]].tolist()
    assert targets == separate
    assert byte_tokenizer.decode(targets) == completion
    assert byte_tokenizer.decode(batch.input_ids[0][~batch.target_mask[0]].tolist()) == prompt


def test_empty_prompt_without_bos_starts_targets_at_second_token(byte_tokenizer):
    [batch], _ = collect_queries(byte_tokenizer, [Query("q", "", "hello world")])
    assert batch.target_mask[0].tolist() == [False, True]


def test_empty_prompt_with_bos_targets_every_completion_token(word_tokenizer):
    [batch], _ = collect_queries(word_tokenizer, [Query("q", "", "hello world")])
    assert batch.input_ids[0].tolist() == word_tokenizer("hello world")["input_ids"]
    assert batch.target_mask[0].tolist() == [False, True, True]


def test_query_skips(word_tokenizer, byte_tokenizer):
    queries = [
        Query("long", "the cat sat on", "the mat"),  # BOS + 4 + 2 = 7 > 6
        Query("blank", "hello", "   "),  # no completion tokens
        Query("ok", "hello", "world"),
    ]
    batches, skips = collect_queries(word_tokenizer, queries, max_length=6)
    assert [b.ids for b in batches] == [["ok"]]
    assert [s.item_id for s in skips] == ["long", "blank"]
    assert "7 tokens (prompt 5, completion 2), over max_length 6" in skips[0].reason
    assert "completion has 0 tokens" in skips[1].reason

    # Without BOS, an empty prompt and a one-token completion leave nothing to predict.
    batches, skips = collect_queries(byte_tokenizer, [Query("one", "", "h")])
    assert batches == [] and [s.item_id for s in skips] == ["one"]


# --- log-probabilities ---------------------------------------------------------


def test_sequence_log_prob_matches_a_hand_loop(byte_tokenizer, model):
    documents = docs("hello world", "the world is round", "the cat sat on the mat")
    queries = [Query("q0", "hello wor", "ld"), Query("q1", "", "the world is round")]
    [doc_batch], _ = collect_documents(byte_tokenizer, documents)
    [query_batch], _ = collect_queries(byte_tokenizer, queries)
    for batch in (doc_batch, query_batch):
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        result = sequence_log_prob(logits, batch)
        assert result.shape == (len(batch.ids),) and result.dtype == torch.float32
        assert result.tolist() == pytest.approx(hand_log_probs(logits, batch), abs=1e-5)


def test_sequence_log_prob_is_padding_invariant(byte_tokenizer, model):
    documents = docs("hello world", "the cat sat on the mat", "worlds apart")
    [padded], _ = collect_documents(byte_tokenizer, documents)
    assert padded.attention_mask[0].sum() < padded.input_ids.shape[1]
    with torch.no_grad():
        together = sequence_log_prob(model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits, padded)
        for i, document in enumerate(documents):
            [alone], _ = collect_documents(byte_tokenizer, [document])
            logits = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits
            assert torch.allclose(sequence_log_prob(logits, alone)[0], together[i], atol=1e-5)


def test_sequence_log_prob_ignores_padding_logits_and_upcasts(word_tokenizer):
    [batch], _ = collect_documents(word_tokenizer, docs("hello world", "the world is round"))
    logits = torch.randn(2, 5, len(word_tokenizer), dtype=torch.bfloat16, requires_grad=True)
    poisoned = logits.detach().clone()
    poisoned[0, 2:] = float("nan")  # positions 2.. of row 0 predict padding only
    result = sequence_log_prob(logits, batch)
    assert result.dtype == torch.float32
    assert torch.isfinite(sequence_log_prob(poisoned, batch)).all()
    assert torch.equal(sequence_log_prob(poisoned, batch), result.detach())
    result.sum().backward()
    assert logits.grad is not None and logits.grad[0, 2:].abs().sum() == 0


def test_to_moves_tensors(word_tokenizer):
    [batch], _ = collect_documents(word_tokenizer, docs("hello world"))
    moved = batch.to("cpu")
    assert isinstance(moved, TokenBatch) and moved.ids == batch.ids
    assert torch.equal(moved.target_mask, batch.target_mask)


def test_one_pass_truncation_equals_encoding_twice(word_tokenizer, byte_tokenizer):
    """The fast path (overflow pieces) against the definition: a text is cut when it has more than
    max_length tokens, and a cut text is the tokenizer's own truncation at max_length."""
    from attribution.data.batching import _encode_truncated

    with_eos = Tokenizer.from_str(word_tokenizer.backend_tokenizer.to_str())
    with_eos.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    eos_tokenizer = PreTrainedTokenizerFast(tokenizer_object=with_eos, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    texts = [" ".join(["hello", "world"] * n) for n in range(7)] + SENTENCES
    for tokenizer in (word_tokenizer, eos_tokenizer, byte_tokenizer):
        for max_length in (2, 3, 4, 5, 8):
            expected = []
            for text in texts:
                full = tokenizer(text, add_special_tokens=True)["input_ids"]
                cut = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
                expected.append((cut, len(full) > max_length))
            assert _encode_truncated(tokenizer, texts, max_length) == expected
            assert _encode_truncated(_NotFast(tokenizer), texts, max_length) == expected


class _NotFast:
    """The same tokenizer through the path for tokenizers without overflow pieces."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)
