"""The output layer a chunk of positions at a time: the gradients and draws of the whole-logits loss,
with no tensor larger than a chunk's (C, V) logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from attribution.curvature.objective import draw_tokens, pseudo_loss, sample_targets
from attribution.data.batching import sequence_log_prob
from attribution.log_prob import backward_log_prob, head_is_last
from tests.tiny import ARCHITECTURES, VOCAB, make_batch, query_batch, random_sequences, tiny_model


def whole_logits_gradients(model, batch, fisher, seed):
    """The plain reference: every position's logits at once, differentiated by autograd."""
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if fisher == "true":
        loss = pseudo_loss(logits, batch, "true", seed)
        log_probs = -loss.detach()
    else:
        per_sequence = sequence_log_prob(logits, batch)
        per_sequence.sum().backward()
        return per_sequence.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    return log_probs, {n: p.grad.clone() for n, p in model.named_parameters()}


def chunked_gradients(model, batch, fisher, seed, chunk_bytes):
    model.zero_grad()
    sign = -1.0 if fisher == "true" else 1.0
    per_sequence = backward_log_prob(model, batch, sign=sign, fisher=fisher, seed=seed, chunk_bytes=chunk_bytes)
    return per_sequence, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fisher", [None, "true"])
def test_chunked_output_layer_gives_the_whole_logits_gradients(architecture, fisher):
    model = tiny_model(architecture)
    assert head_is_last(model)
    batch = make_batch(random_sequences(5, seed=2, min_length=2, max_length=11))
    expected_log_probs, expected = whole_logits_gradients(model, batch, fisher, seed=5)
    # Three positions per chunk at VOCAB entries of 4 bytes: chunks cross sequence boundaries.
    log_probs, gradients = chunked_gradients(model, batch, fisher, seed=5, chunk_bytes=3 * 4 * VOCAB)
    if fisher == "true":
        assert torch.allclose(log_probs.sum(), expected_log_probs, rtol=1e-10)
    else:
        assert torch.allclose(log_probs, expected_log_probs, rtol=1e-10)
    for name, gradient in expected.items():
        assert torch.allclose(gradients[name], gradient, rtol=1e-8, atol=1e-12), name


def test_only_target_positions_reach_the_output_layer_in_chunks_of_the_budget():
    model = tiny_model("llama")
    batch = query_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 11], [12, 13, 14, 15, 16]])
    assert head_is_last(model)  # its probe is the one full forward through the output layer
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        backward_log_prob(model, batch, chunk_bytes=3 * 4 * VOCAB)
    finally:
        handle.remove()
    # The model's own pass runs the layer as the identity: (B, T, H) out; then 8 completion tokens in chunks of 3.
    assert shapes == [(2, 7, 8), (3, VOCAB), (3, VOCAB), (2, VOCAB)]


def test_a_soft_capped_head_runs_on_its_own_logits_with_the_same_gradients():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=4, max_position_embeddings=32, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    assert not head_is_last(model)
    batch = make_batch(random_sequences(3, seed=1))
    expected_log_probs, expected = whole_logits_gradients(model, batch, None, seed=0)
    log_probs, gradients = chunked_gradients(model, batch, None, seed=0, chunk_bytes=2 * 4 * VOCAB)
    assert torch.allclose(log_probs, expected_log_probs, rtol=1e-10)
    for name, gradient in expected.items():
        assert torch.allclose(gradients[name], gradient, rtol=1e-8, atol=1e-12), name


def test_a_sequence_draws_the_same_labels_in_any_batch_and_padding():
    model = tiny_model("gpt_neox")
    sequences = random_sequences(4, seed=9, min_length=4, max_length=12)
    alone = [float(backward_log_prob(model, make_batch([s], [f"d{i}"]), fisher="true", seed=3)) for i, s in enumerate(sequences)]
    together = backward_log_prob(model, make_batch(sequences, [f"d{i}" for i in range(4)]), fisher="true", seed=3,
                                 chunk_bytes=5 * 8 * VOCAB)
    assert torch.allclose(together, torch.tensor(alone, dtype=together.dtype), rtol=1e-10)
    other_seed = backward_log_prob(model, make_batch(sequences, [f"d{i}" for i in range(4)]), fisher="true", seed=4)
    assert not torch.allclose(other_seed, together)


def test_draws_follow_the_softmax():
    """Inverse-CDF draws: the frequency of each token over 40,000 uniforms is its probability,
    within 5 standard errors."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]])
    probabilities = torch.softmax(logits.double(), -1)[0]
    uniforms = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = draw_tokens(logits.expand(len(uniforms), -1), uniforms)
    frequencies = torch.bincount(drawn, minlength=5).double() / len(uniforms)
    tolerance = 5 * torch.sqrt(probabilities * (1 - probabilities) / len(uniforms)) + 1e-12
    assert ((frequencies - probabilities).abs() <= tolerance).all(), (frequencies, probabilities)
    assert drawn.max() < 5


def test_a_non_finite_position_keeps_its_data_token():
    batch = make_batch([[1, 2, 3, 4, 5]])
    logits = torch.randn(1, 5, VOCAB, dtype=torch.float64)
    logits[0, 2, 7] = math.nan
    drawn = sample_targets(logits, batch, seed=0)
    assert drawn[0, 3] == 4  # predicted by position 2: its data token
    assert (drawn[0, 1:] >= 0).all()
