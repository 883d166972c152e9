"""Differentiate a sequence log-probability through the output layer a chunk of positions at a time.

The output layer maps the last hidden states ``h`` (B, T, H) to logits (B, T, V). At a 128k
vocabulary and 8 x 4,096 tokens those are 16 GiB in float32, and a loss's softmax and its
gradient as much again. Here the model runs with its output layer replaced by the identity, so
its output is ``h``, and the objective

    L = sign * sum_n sum_{t in targets(n)} log softmax(W_out h_{n,t-1})[y_{n,t}]

is formed and differentiated ``C`` target positions at a time: ``dL/dh`` is accumulated chunk
by chunk on a detached copy of ``h``, then sent back through the model in one backward pass. The
gradients are those of the whole-logits loss; the largest tensor is (C, V), ``C`` chosen so that
the chunk's logits take at most ``chunk_bytes``.

A model whose output is not ``W_out h`` (a final soft-cap or scale after the output layer, or a
head that is not its ``get_output_embeddings()``) is detected once, on a short probe, and runs
with its own whole logits, chunked only in the loss.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from attribution.curvature.objective import Fisher, draw_tokens, fisher_uniforms
from attribution.data.batching import TokenBatch
from attribution.models import TrackedModule

# Logits of one chunk, float32: 64 MiB is 128 positions at a 128k vocabulary. The chunk's softmax,
# its gradient and (true Fisher) the float64 CDF of the draw take about 4x that at their peak.
DEFAULT_CHUNK_BYTES = 64 * 2**20

# Per model: whether its logits are its output layer applied to its output with that layer replaced.
_HEAD_IS_LAST: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@contextmanager
def identity_output_layer(model: PreTrainedModel) -> Iterator[nn.Module]:
    """The model's output layer, with its forward replaced by the identity for the duration."""
    head = model.get_output_embeddings()
    # An instance-level forward (accelerate's offloading hooks install one) is put back as it was.
    previous = head.__dict__.get("forward")
    head.forward = lambda hidden: hidden  # type: ignore[method-assign]
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def head_is_last(model: PreTrainedModel) -> bool:
    """Whether ``model(x).logits == W_out(h)`` with ``h`` the output of the model without its output
    layer: checked once per model on an 8-token probe, in float32 tolerance."""
    if model in _HEAD_IS_LAST:
        return _HEAD_IS_LAST[model]
    head = model.get_output_embeddings()
    verdict = False
    if isinstance(head, nn.Linear):
        device = next(model.parameters()).device
        vocabulary = head.out_features
        ids = torch.arange(1, 9, device=device).remainder(vocabulary).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            with identity_output_layer(model) as layer:
                hidden = model(input_ids=ids).logits
                verdict = hidden.shape[-1] == head.in_features
            # Non-finite logits leave the question open: the model's own logits are right either way.
            verdict = verdict and bool(torch.isfinite(logits).all())
            if verdict:
                rebuilt = layer(hidden)
                scale = float(logits.abs().max()) or 1.0
                verdict = rebuilt.shape == logits.shape and torch.allclose(rebuilt.float(), logits.float(), rtol=1e-4,
                                                                            atol=1e-5 * scale)
    _HEAD_IS_LAST[model] = verdict
    return verdict


def chunk_positions(vocabulary: int, chunk_bytes: int) -> int:
    """Target positions per chunk: float32 logits of at most ``chunk_bytes``, at least one position."""
    return max(1, chunk_bytes // (4 * vocabulary))


def backward_log_prob(
    model: PreTrainedModel,
    batch: TokenBatch,
    sign: float = 1.0,
    fisher: Fisher | None = None,
    seed: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tracked: Sequence[TrackedModule] = (),
) -> torch.Tensor:
    """Backpropagate ``sign * sum_n log p(y_n)`` and return ``log p(y_n)`` per sequence (B,), detached.

    ``y`` are the data tokens at the target positions, or with ``fisher="true"`` draws from the
    model's own predictions there (:func:`attribution.curvature.objective.sample_targets` gives the
    same draws from whole logits). Float32 (or wider) log-probabilities, as
    :func:`attribution.data.batching.sequence_log_prob`. An output layer among the ``tracked``
    modules must see every position in one call, so it runs whole.
    """
    head = model.get_output_embeddings()
    chunked_head = head_is_last(model) and not any(module.module is head for module in tracked)
    if chunked_head:
        with identity_output_layer(model) as layer:
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        project: Callable[[torch.Tensor], torch.Tensor] = layer
        vocabulary = layer.out_features
    else:
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        project = nn.Identity()
        vocabulary = hidden.shape[-1]
    rows, columns = batch.target_mask[:, 1:].nonzero(as_tuple=True)
    targets = batch.input_ids[rows, columns + 1].to(hidden.device)
    uniforms = fisher_uniforms(batch, seed)[rows, columns + 1] if fisher == "true" else None
    rows, columns = rows.to(hidden.device), columns.to(hidden.device)
    leaf = hidden.detach().requires_grad_(True)
    token_log_probs = torch.empty(len(rows), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    step = chunk_positions(vocabulary, chunk_bytes)
    with torch.enable_grad():
        for start in range(0, len(rows), step):
            chunk = slice(start, start + step)
            logits = project(leaf[rows[chunk], columns[chunk]]).to(token_log_probs.dtype)
            chosen = targets[chunk]
            if uniforms is not None:
                drawn = draw_tokens(logits, uniforms[chunk])
                chosen = torch.where(drawn >= 0, drawn, chosen)
            log_probs = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            (sign * log_probs.sum()).backward()
            token_log_probs[chunk] = log_probs.detach()
    if leaf.grad is not None and hidden.requires_grad:
        hidden.backward(leaf.grad)
    per_sequence = torch.zeros(len(batch.ids), dtype=token_log_probs.dtype, device=hidden.device)
    return per_sequence.index_add_(0, rows, token_log_probs)
