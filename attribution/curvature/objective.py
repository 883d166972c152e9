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


def sample_targets(logits: torch.Tensor, batch: TokenBatch, seed: int) -> torch.Tensor:
    """Input ids with every target position replaced by a draw from the model.

    Position ``t`` is predicted by the logits at ``t - 1``. One sequence at a time, and only its
    target positions, goes through the softmax: never the whole (batch, sequence, vocabulary)
    tensor (2 GiB at 8 x 512 over a 128k vocabulary), which the model's logits already are. A
    sequence whose logits at a target position are NaN or Inf has no distribution to draw from:
    it keeps its data tokens. Its loss, and from it every module's output gradients, are then
    non-finite, and the fit names the module after the pass (:mod:`attribution.curvature.finite`),
    as it does for the empirical Fisher, instead of ``torch.multinomial`` failing on this worker alone.
    """
    targets = batch.input_ids.clone()
    for row, sequence_id in enumerate(batch.ids):
        positions = batch.target_mask[row, 1:].nonzero().squeeze(1).to(logits.device)
        if positions.numel() == 0:
            continue
        probabilities = torch.softmax(logits[row, positions].detach().float(), dim=-1)
        # The maximum is NaN or Inf exactly when an entry is; cheaper than a full isfinite mask.
        if not torch.isfinite(probabilities.amax(dim=-1)).all():
            continue
        generator = torch.Generator(device=logits.device).manual_seed(sequence_seed(seed, sequence_id))
        drawn = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        targets[row, positions.to(targets.device) + 1] = drawn.to(targets.device)
    return targets


def pseudo_loss(logits: torch.Tensor, batch: TokenBatch, fisher: Fisher, seed: int) -> torch.Tensor:
    """``-sum_n sum_t log p(y_{n,t} | x_{n,<t})`` with sampled or data targets ``y``."""
    if fisher == "true":
        batch = replace(batch, input_ids=sample_targets(logits, batch, seed))
    return -sequence_log_prob(logits, batch).sum()
