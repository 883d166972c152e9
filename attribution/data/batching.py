"""Tokenization and batching of documents and queries for causal LMs.

Every batch carries a ``target_mask``: position ``t`` is True when
``log p(input_ids[t] | input_ids[:t])`` is part of the objective. For a
document that is every token but the first (``log p(z)``, prompt-free); for a
query it is the completion tokens (``m(q) = log p(completion | prompt)``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from attribution.data.bad_input import Skip, SkipHandler
from attribution.data.corpus import Document
from attribution.data.queries import Query

T = TypeVar("T")


@dataclass
class TokenBatch:
    """Right-padded token ids of a batch of documents or queries.

    ``truncated[b]`` says that sequence ``b`` was cut to ``max_length`` tokens
    (documents only; a query is skipped rather than truncated).
    """

    ids: list[str]
    shards: list[str]
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    target_mask: torch.Tensor  # (B, T) bool, True on prediction targets
    truncated: list[bool]

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch with its tensors on ``device``."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            target_mask=self.target_mask.to(device),
        )

    @property
    def num_tokens(self) -> int:
        """Number of non-padding tokens."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class _Sequence:
    """One tokenized item before collation; targets are positions in ``tokens``."""

    id: str
    shard: str
    tokens: list[int]
    first_target: int
    truncated: bool = False


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else 0.

    Padding positions are masked out of attention and targets, so the choice
    only has to be a valid token id.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def batch_documents(
    tokenizer: Any,
    documents: Iterable[Document],
    batch_size: int,
    max_length: int,
    on_skip: SkipHandler,
) -> Iterator[TokenBatch]:
    """Tokenize documents (with the tokenizer's special tokens) and batch them.

    A document longer than ``max_length`` tokens is cut to its first
    ``max_length`` and flagged in ``truncated``; one with fewer than two
    tokens has nothing to predict and goes to ``on_skip``.
    """
    _check_sizes(batch_size, max_length)
    sequences = _tokenize_documents(tokenizer, documents, batch_size, max_length, on_skip)
    for chunk in _chunks(sequences, batch_size):
        yield _collate(chunk, pad_id(tokenizer))


def batch_queries(
    tokenizer: Any,
    queries: Iterable[Query],
    batch_size: int,
    max_length: int,
    on_skip: SkipHandler,
) -> Iterator[TokenBatch]:
    """Tokenize queries as prompt + completion and batch them.

    Prompt and completion are tokenized separately (the prompt with the
    tokenizer's special tokens, the completion without) and concatenated, so
    the completion's tokens are exactly those of the completion text even
    where a joint tokenization would merge across the boundary. Leading
    whitespace therefore belongs in the completion (``" Paris"``), as it
    would appear after the prompt.

    Targets are the completion tokens. When the prompt yields no tokens at all
    (an empty prompt and no BOS token), the first completion token has no
    context to be predicted from, so targets start at its second token.
    Queries that would exceed ``max_length``, or have no target token, go to
    ``on_skip``; a completion is never truncated.
    """
    _check_sizes(batch_size, max_length)
    sequences = _tokenize_queries(tokenizer, queries, max_length, on_skip)
    for chunk in _chunks(sequences, batch_size):
        yield _collate(chunk, pad_id(tokenizer))


def sequence_log_prob(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Sum over target positions of ``log p(target token)``, shape (B,).

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``. Computed in float32 (or
    the logits' dtype if wider) and differentiable with respect to ``logits``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    predicting = logits[:, :-1].to(dtype)
    targets = batch.input_ids[:, 1:].to(logits.device)
    mask = batch.target_mask[:, 1:].to(logits.device)
    # log p(y) = logit_y - logsumexp(logits): avoids a full (B, T, V) log-softmax.
    chosen = predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_log_probs = chosen - torch.logsumexp(predicting, dim=-1)
    # where (not multiply): padding positions may hold -inf/NaN, which 0 * x keeps.
    return torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs)).sum(dim=-1)


def _tokenize_documents(
    tokenizer: Any,
    documents: Iterable[Document],
    chunk_size: int,
    max_length: int,
    on_skip: SkipHandler,
) -> Iterator[_Sequence]:
    """Tokenize documents a chunk at a time (fast tokenizers batch in parallel)."""
    for chunk in _chunks(documents, chunk_size):
        for doc, (tokens, truncated) in zip(chunk, _encode_truncated(tokenizer, [doc.text for doc in chunk], max_length)):
            if len(tokens) < 2:
                on_skip(Skip(doc.id, doc.shard, doc.row, "fewer than two tokens"))
                continue
            yield _Sequence(doc.id, doc.shard, tokens, first_target=1, truncated=truncated)


def _encode_truncated(tokenizer: Any, texts: list[str], max_length: int) -> list[tuple[list[int], bool]]:
    """Each text's first ``max_length`` tokens, special tokens placed as the tokenizer places
    them on a cut text (an appended EOS survives), and whether the text was cut.

    A fast tokenizer does both in one pass: the pieces it returns beyond the first are the
    overflow of a cut text. Otherwise one token over the budget tells truncated from exactly
    fitting texts, and only the cut ones are encoded again.
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                            return_overflowing_tokens=True)
        first: dict[int, int] = {}
        pieces: Counter[int] = Counter()
        for position, text_index in enumerate(encoded["overflow_to_sample_mapping"]):
            first.setdefault(text_index, position)
            pieces[text_index] += 1
        return [(list(encoded["input_ids"][first[i]]) if i in first else [], pieces[i] > 1) for i in range(len(texts))]
    probe = _encode(tokenizer, texts, max_length + 1)
    cut = [i for i, tokens in enumerate(probe) if len(tokens) > max_length]
    again = dict(zip(cut, _encode(tokenizer, [texts[i] for i in cut], max_length))) if cut else {}
    return [(again.get(i, tokens), i in again) for i, tokens in enumerate(probe)]


def _tokenize_queries(
    tokenizer: Any, queries: Iterable[Query], max_length: int, on_skip: SkipHandler
) -> Iterator[_Sequence]:
    for query in queries:
        prompt = tokenizer(query.prompt, add_special_tokens=True)["input_ids"]
        completion = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        # With no prompt token at all, completion token 0 has nothing to condition on.
        first_target = max(len(prompt), 1)
        total = len(prompt) + len(completion)
        reason = None
        if total > max_length:
            reason = (
                f"prompt + completion is {total} tokens (prompt {len(prompt)}, "
                f"completion {len(completion)}), over max_length {max_length}"
            )
        elif total <= first_target:
            reason = f"no completion token to predict (completion has {len(completion)} tokens)"
        if reason is not None:
            on_skip(Skip(query.id, query.file, query.row, reason))
            continue
        yield _Sequence(query.id, "", prompt + completion, first_target)


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(tokens) for tokens in encoded["input_ids"]]


def _collate(sequences: Sequence[_Sequence], padding: int) -> TokenBatch:
    """Right-pad to the longest sequence of the batch."""
    width = max(len(s.tokens) for s in sequences)
    shape = (len(sequences), width)
    input_ids = torch.full(shape, padding, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    for b, sequence in enumerate(sequences):
        length = len(sequence.tokens)
        input_ids[b, :length] = torch.tensor(sequence.tokens, dtype=torch.long)
        attention_mask[b, :length] = 1
        target_mask[b, sequence.first_target : length] = True
    return TokenBatch(
        ids=[s.id for s in sequences],
        shards=[s.shard for s in sequences],
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_mask=target_mask,
        truncated=[s.truncated for s in sequences],
    )


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_sizes(batch_size: int, max_length: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
