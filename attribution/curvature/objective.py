"""The loss whose output gradients define the Gauss-Newton pseudo-gradients.

With ``fisher="true"`` the targets are drawn from the model's own predictive
distribution, ``y_t ~ p(. | x_<t)``, so that ``E[ds ds^T]`` estimates the
Gauss-Newton (true Fisher) curvature; with ``fisher="empirical"`` the targets are
the data tokens themselves. Each sequence draws from its own generator seeded by
``(seed, sequence id)``: the draw does not depend on batch size, batch order or
padding, and both fitting passes see the same targets.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Literal

import torch

from attribution.data.batching import TokenBatch, sequence_log_prob

Fisher = Literal["true", "empirical"]


def normalise_fisher(value: bool | str) -> Fisher:
    """Hydra parses ``factors.fisher=true`` as a boolean; accept both spellings."""
    if value is True or str(value).lower() == "true":
        return "true"
    if str(value).lower() == "empirical":
        return "empirical"
    raise ValueError(f"factors.fisher must be true or empirical, got {value!r}")


def sequence_seed(seed: int, sequence_id: str) -> int:
    """A 63-bit seed that depends only on the run seed and the sequence id."""
    digest = hashlib.sha256(f"{seed}:{sequence_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fisher_uniforms(batch: TokenBatch, seed: int) -> torch.Tensor:
    """One uniform draw ``u_{n,t}`` in [0, 1) per target position, float64 (B, T), 0 elsewhere.

    Sequence ``n`` draws its uniforms from its own generator in the order of its target
    positions, so ``u`` depends on the sequence id and its own tokens alone: not on the batch it
    is in, its padding, or how the positions are split into chunks.
    """
    uniforms = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
    for row, sequence_id in enumerate(batch.ids):
        positions = batch.target_mask[row].cpu().nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(sequence_seed(seed, sequence_id))
        uniforms[row, positions] = torch.rand(len(positions), generator=generator, dtype=torch.float64)
    return uniforms.to(batch.input_ids.device)


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``y ~ softmax(logits)`` per row of (N, V) logits by inverting the CDF at (N,) uniforms:
    ``y = min{v : sum_{w <= v} p_w > u}``; -1 for a row whose logits are NaN or Inf (no
    distribution to draw from)."""
    probabilities = torch.softmax(logits.detach().double(), dim=-1)
    cumulative = probabilities.cumsum(-1)
    drawn = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1), right=True).squeeze(1)
    drawn = drawn.clamp_max(logits.shape[-1] - 1)
    # The maximum is NaN or Inf exactly when an entry is; cheaper than a full isfinite mask.
    return torch.where(torch.isfinite(logits.detach().amax(-1)), drawn, torch.full_like(drawn, -1))


def sample_targets(logits: torch.Tensor, batch: TokenBatch, seed: int) -> torch.Tensor:
    """Input ids with every target position ``t`` replaced by a draw from ``p(. | x_<t)``.

    Position ``t`` is predicted by the logits at ``t - 1``. Only the target positions go through
    the softmax, one sequence at a time. A position whose logits are NaN or Inf keeps its data
    token; its loss, and from it every module's output gradients, are then non-finite, and the fit
    names the module after the pass (:mod:`attribution.curvature.finite`), as it does for the
    empirical Fisher. The draws are those of :func:`attribution.log_prob.backward_log_prob`, which
    never holds the whole (batch, sequence, vocabulary) logits.
    """
    targets = batch.input_ids.clone()
    uniforms = fisher_uniforms(batch, seed)
    for row in range(len(batch.ids)):
        positions = batch.target_mask[row, 1:].nonzero().squeeze(1).to(logits.device)
        if positions.numel() == 0:
            continue
        drawn = draw_tokens(logits[row, positions], uniforms[row, positions + 1])
        targets[row, positions + 1] = torch.where(drawn >= 0, drawn, targets[row, positions + 1])
    return targets


def pseudo_loss(logits: torch.Tensor, batch: TokenBatch, fisher: Fisher, seed: int) -> torch.Tensor:
    """``-sum_n sum_t log p(y_{n,t} | x_{n,<t})`` with sampled or data targets ``y``."""
    if fisher == "true":
        batch = replace(batch, input_ids=sample_targets(logits, batch, seed))
    return -sequence_log_prob(logits, batch).sum()
