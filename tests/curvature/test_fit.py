"""EK-FAC fitting against dense brute force on tiny models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from attribution.curvature.capture import augment_with_bias
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.objective import pseudo_loss
from attribution.curvature.precondition import Preconditioner
from attribution.models import find_tracked_modules
from tests.tiny import make_batch, random_sequences, tiny_model

SEQUENCES = random_sequences(6, seed=3)
# BLOOM computes its attention softmax in float32 even in a float64 model.
TOLERANCE = {"bloom": 1e-5}
IDS = [f"doc-{i}" for i in range(len(SEQUENCES))]


def fit(model, strategy="ekfac", fisher="true", batch_size=3, sequences=SEQUENCES, ids=IDS):
    tracked = find_tracked_modules(model)

    def batches():
        for start in range(0, len(sequences), batch_size):
            yield make_batch(sequences[start : start + batch_size], ids[start : start + batch_size])

    config = FitConfig(strategy=strategy, fisher=fisher, seed=7, dtype=torch.float64, progress=False)
    return fit_factors(model, tracked, batches, config, model_fingerprint="test", data_description={})


def brute_force(model, fisher="true"):
    """Per sequence, alone and unpadded, with parameters requiring grad: autograd weight
    gradients dW_n, and per-token a_t, ds_t from retained output gradients."""
    tracked = find_tracked_modules(model)
    weight_gradients = {m.name: [] for m in tracked}
    activations = {m.name: [] for m in tracked}
    output_gradients = {m.name: [] for m in tracked}
    for sequence, sequence_id in zip(SEQUENCES, IDS):
        batch = make_batch([sequence], [sequence_id])
        inputs, outputs = {}, {}

        def keep(module, args, output, name):
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output

        handles = [m.module.register_forward_hook(lambda mod, a, o, n=m.name: keep(mod, a, o, n)) for m in tracked]
        model.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        pseudo_loss(logits, batch, fisher, seed=7).backward()
        for handle in handles:
            handle.remove()
        for m in tracked:
            weight_gradients[m.name].append(m.weight_gradient().detach().clone())
            activations[m.name].append(augment_with_bias(inputs[m.name][0], m.bias))
            output_gradients[m.name].append(outputs[m.name].grad[0])
    return tracked, weight_gradients, activations, output_gradients


def assert_close(actual, expected, rtol=1e-8):
    """Elementwise closeness with the absolute tolerance scaled to the tensor's magnitude."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def dense_ekfac(factors):
    """G = (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T, row-major vec."""
    basis = torch.kron(factors.gradient_eigenvectors, factors.activation_eigenvectors)
    return basis @ torch.diag(factors.corrected_eigenvalues.flatten()) @ basis.T, basis


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_ekfac_matches_dense_brute_force(architecture, fisher):
    if fisher == "empirical" and architecture != "gpt_neox":
        pytest.skip("the label source is architecture-independent; one architecture suffices")
    model = tiny_model(architecture)
    fitted = fit(model, fisher=fisher)
    tracked, weight_gradients, activations, output_gradients = brute_force(model, fisher)
    assert fitted.manifest.num_sequences == len(SEQUENCES)
    assert fitted.manifest.num_tokens == sum(len(s) for s in SEQUENCES)
    for module in tracked:
        factors = fitted.modules[module.name]
        a = torch.cat(activations[module.name])
        ds = torch.cat(output_gradients[module.name])
        rtol = TOLERANCE.get(architecture, 1e-9)
        assert_close(factors.activation_covariance, a.T @ a / a.shape[0], rtol=rtol)
        assert_close(factors.gradient_covariance, ds.T @ ds / ds.shape[0], rtol=rtol)

        flat = torch.stack([g.flatten() for g in weight_gradients[module.name]])
        gauss_newton = flat.T @ flat / flat.shape[0]
        basis = torch.kron(factors.gradient_eigenvectors, factors.activation_eigenvectors)
        expected = torch.diagonal(basis.T @ gauss_newton @ basis).reshape(module.d_out, module.d_in_augmented)
        assert_close(factors.corrected_eigenvalues, expected, rtol=rtol)
        assert float(gauss_newton.abs().max()) > 0, "a vacuous test: no gradient signal"


def test_inverse_product_equals_dense_solve(architecture):
    model = tiny_model(architecture)
    fitted = fit(model)
    generator = torch.Generator().manual_seed(0)
    for damping in (None, 1e-3):
        preconditioner = Preconditioner(fitted, damping=damping)
        for spec in fitted.manifest.modules:
            factors = fitted.modules[spec.name]
            gauss_newton, _ = dense_ekfac(factors)
            lam = 0.1 * factors.corrected_eigenvalues.mean() if damping is None else damping
            vector = torch.randn(spec.d_out, spec.d_in + spec.bias, generator=generator, dtype=torch.float64)
            expected = torch.linalg.solve(gauss_newton + lam * torch.eye(gauss_newton.shape[0], dtype=torch.float64), vector.flatten())
            assert_close(preconditioner.apply(spec.name, vector).flatten(), expected, rtol=1e-7)


def test_kfac_is_kronecker_product_of_covariances():
    fitted = fit(tiny_model("gpt2"), strategy="kfac")
    for factors in fitted.modules.values():
        gauss_newton, _ = dense_ekfac(factors)
        expected = torch.kron(factors.gradient_covariance, factors.activation_covariance)
        assert_close(gauss_newton, expected, rtol=1e-8)


def test_diagonal_is_mean_squared_gradient():
    model = tiny_model("gpt_neox")
    fitted = fit(model, strategy="diagonal")
    tracked, weight_gradients, _, _ = brute_force(model)
    for module in tracked:
        expected = torch.stack(weight_gradients[module.name]).square().mean(0)
        assert_close(fitted.modules[module.name].corrected_eigenvalues, expected, rtol=1e-8)


def test_identity_preconditioner_is_identity():
    fitted = fit(tiny_model("llama"), strategy="identity")
    preconditioner = Preconditioner(fitted, damping=0.5)
    for spec in fitted.manifest.modules:
        vector = torch.randn(spec.d_out, spec.d_in + spec.bias, dtype=torch.float64)
        torch.testing.assert_close(preconditioner.apply(spec.name, vector), vector)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_factors_do_not_depend_on_batch_size_or_padding(strategy):
    model = tiny_model("gpt_neox")
    one_at_a_time = fit(model, strategy=strategy, batch_size=1)
    all_padded = fit(model, strategy=strategy, batch_size=len(SEQUENCES))
    reordered = list(reversed(range(len(SEQUENCES))))
    shuffled = fit(model, strategy=strategy, batch_size=4,
                   sequences=[SEQUENCES[i] for i in reordered], ids=[IDS[i] for i in reordered])
    vector_generator = torch.Generator().manual_seed(1)
    for other in (all_padded, shuffled):
        for spec in one_at_a_time.manifest.modules:
            left, right = one_at_a_time.modules[spec.name], other.modules[spec.name]
            assert_close(left.activation_covariance, right.activation_covariance, rtol=1e-9)
            assert_close(left.gradient_covariance, right.gradient_covariance, rtol=1e-9)
            # Eigenvectors are defined up to sign, so compare what they imply: the preconditioned vector.
            vector = torch.randn(spec.d_out, spec.d_in + spec.bias, generator=vector_generator, dtype=torch.float64)
            assert_close(
                Preconditioner(one_at_a_time).apply(spec.name, vector),
                Preconditioner(other).apply(spec.name, vector),
                rtol=1e-6,
            )


def test_capture_restores_requires_grad():
    model = tiny_model("gpt_neox")
    fit(model)
    assert all(p.requires_grad for p in model.parameters())
