"""Gauss-Newton-vector products against an explicit G built by enumerating every label, and EK-FAC's scale."""

from __future__ import annotations

import pytest
import torch

from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.gauss_newton import (
    GaussNewton,
    dense_gauss_newton,
    use_eager_attention,
)
from attribution.curvature.parameters import ParameterLayout
from attribution.models import TrackedModule, find_tracked_modules
from tests.tiny import VOCAB, make_batch, random_sequences, tiny_model

# Short sequences of different lengths: the batch is padded, so masking is exercised.
SEQUENCES = random_sequences(3, seed=5, min_length=3, max_length=5)


def eager_model(architecture: str = "gpt_neox"):
    model = tiny_model(architecture)
    use_eager_attention(model)
    return model


def enumerated_gauss_newton(model, sequences) -> torch.Tensor:
    """``(1/N) sum_n sum_t sum_y p(y) g g^T`` with ``g = grad_theta log p(y | x_<t)``, by autograd, one
    label at a time: the expected outer product of the per-sequence pseudo-gradient under
    labels sampled from the model (labels at different positions are independent and their
    gradients have mean zero, so cross-position terms vanish)."""
    tracked = find_tracked_modules(model)
    layout = ParameterLayout(tracked)
    weighted_gradients = []  # sqrt(p(y)) g, so that G = R^T R / N
    for sequence in sequences:
        batch = make_batch([sequence])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(len(sequence) - 1):  # logits at t predict token t + 1
            for label in range(VOCAB):
                model.zero_grad()
                log_probs[position, label].backward(retain_graph=True)
                gradient = layout.join({m.name: m.weight_gradient().unsqueeze(0) for m in tracked})[0]
                weighted_gradients.append(log_probs[position, label].detach().exp().sqrt() * gradient)
    rows = torch.stack(weighted_gradients)
    return rows.T @ rows / len(sequences)


@pytest.fixture(scope="module")
def explicit():
    model = eager_model()
    tracked = find_tracked_modules(model)
    return model, tracked, enumerated_gauss_newton(model, SEQUENCES)


def test_products_equal_the_enumerated_matrix_times_a_vector(explicit):
    model, tracked, matrix = explicit
    vectors = torch.randn(3, matrix.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Cached, rebuilt, or the first batch cached and the second rebuilt (cached_sequences=2 holds the
    # first batch's two sequences, not the third); columns through autograd one at a time, or two at a
    # time with a remainder.
    for cache, columns, cached_sequences, kept in ((True, 8, None, 2), (False, 2, None, 0), (True, 1, None, 2),
                                                   (True, 2, 2, 1), (True, 8, 0, 0)):
        operator = GaussNewton(model, tracked, [make_batch(SEQUENCES[:2]), make_batch(SEQUENCES[2:])], cache=cache,
                               columns_per_product=columns, cached_sequences=cached_sequences)
        assert len(operator._cached) == kept
        products = operator(vectors)
        expected = vectors @ matrix
        # GPT-NeoX's eager attention takes its softmax in float32 even in a float64 model.
        torch.testing.assert_close(products, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert float(matrix.abs().max()) > 0
    # Float32 vectors come back in float32, the batches' products added in place.
    narrow = operator(vectors.float())
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), vectors @ matrix, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_hidden_space_products_equal_the_logit_space_ones(explicit):
    """The product taken in hidden space, target positions a few at a time, equals the one linearised at the
    whole logits (the output layer tracked forces that path) on the modules both see."""
    model, tracked, _ = explicit
    batches = [make_batch(SEQUENCES[:2]), make_batch(SEQUENCES[2:])]
    hidden = GaussNewton(model, tracked, batches, chunk_bytes=3 * 8 * VOCAB * 4)  # 3 positions of 8 columns per chunk
    assert hidden._head is not None
    head = model.get_output_embeddings()
    with_head = [*tracked, TrackedModule("embed_out", head, head.in_features, head.out_features, bias=False)]
    logits = GaussNewton(model, with_head, batches)
    assert logits._head is None and len(with_head) == len(tracked) + 1
    vectors = torch.randn(3, hidden.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    padded = torch.cat([vectors, torch.zeros(3, logits.size - hidden.size, dtype=torch.float64)], dim=1)
    expected = logits(padded)[:, :hidden.size]
    torch.testing.assert_close(hidden(vectors), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_dense_matrix_equals_enumerated_matrix(explicit):
    model, tracked, matrix = explicit
    dense = dense_gauss_newton(GaussNewton(model, tracked, [make_batch(SEQUENCES)]), chunk=256)
    torch.testing.assert_close(dense, matrix, rtol=1e-6, atol=1e-6 * float(matrix.abs().max()))


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_conv1d_and_biasless_layouts(architecture):
    """GPT-2 stores weights transposed (Conv1D); Llama has no biases."""
    model = eager_model(architecture)
    tracked = find_tracked_modules(model)
    sequences = SEQUENCES[:2]
    matrix = enumerated_gauss_newton(model, sequences)
    vector = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    product = GaussNewton(model, tracked, [make_batch(sequences)])(vector)
    torch.testing.assert_close(product, matrix @ vector, rtol=1e-6, atol=1e-6 * float((matrix @ vector).abs().max()))


def test_ekfac_eigenvalues_are_on_the_same_per_sequence_scale(explicit):
    """EK-FAC's corrected eigenvalues of a module sum to the trace of its block of the sampled
    G; averaged over label draws that must be the trace of the exact block (per sequence, not
    per token: the tokens per sequence here are 2-4, far outside the tolerance)."""
    model, tracked, matrix = explicit
    layout = ParameterLayout(tracked)
    offsets = torch.tensor([0, *layout.sizes]).cumsum(0)
    draws = []
    for seed in range(48):
        config = FitConfig(strategy="ekfac", fisher="true", seed=seed, dtype=torch.float64, progress=False)
        factors = fit_factors(model, tracked, lambda: [make_batch(SEQUENCES)], config, "test", {})
        draws.append([float(factors.modules[m.name].corrected_eigenvalues.sum()) for m in tracked])
    draws = torch.tensor(draws, dtype=torch.float64)
    mean, standard_error = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    for index, module in enumerate(tracked):
        exact = float(torch.diagonal(matrix)[offsets[index] : offsets[index + 1]].sum())
        assert abs(mean[index] - exact) < 4 * standard_error[index] + 1e-12 * exact, module.name
        assert standard_error[index] < 0.15 * exact, "too few draws to tell the scales apart"
