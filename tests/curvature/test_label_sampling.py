"""Sampled Fisher labels: one sequence's target positions through the softmax at a time, with the
draws a softmax of the whole (batch, sequence, vocabulary) tensor gives."""

from __future__ import annotations

import torch

from attribution.curvature import objective
from attribution.curvature.objective import sample_targets, sequence_seed
from tests.tiny import make_batch, random_sequences


def whole_tensor_draws(logits, batch, seed):
    """The plain reference: softmax of every position of every sequence at once, then per sequence."""
    probabilities = torch.softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.input_ids.clone()
    for row, sequence_id in enumerate(batch.ids):
        positions = batch.target_mask[row, 1:].nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(sequence_seed(seed, sequence_id))
        targets[row, positions + 1] = torch.multinomial(probabilities[row, positions], 1, generator=generator).squeeze(1)
    return targets


def test_draws_equal_the_whole_tensor_softmax_and_only_target_rows_are_softmaxed(monkeypatch):
    batch = make_batch(random_sequences(6, seed=3, min_length=2, max_length=24))
    batch.target_mask[2, 1:5] = False  # a prompt: positions that are not targets are never drawn
    vocabulary = 3000
    logits = torch.randn(*batch.input_ids.shape, vocabulary, generator=torch.Generator().manual_seed(4)) * 4
    shapes = []
    softmax = torch.softmax

    def recording(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return softmax(tensor, *args, **kwargs)

    monkeypatch.setattr(objective.torch, "softmax", recording)
    drawn = sample_targets(logits, batch, seed=11)
    monkeypatch.setattr(objective.torch, "softmax", softmax)
    assert torch.equal(drawn, whole_tensor_draws(logits, batch, seed=11))
    targets_per_row = batch.target_mask[:, 1:].sum(1).tolist()
    assert shapes == [(count, vocabulary) for count in targets_per_row if count]
    assert torch.equal(drawn[~batch.target_mask], batch.input_ids[~batch.target_mask])
