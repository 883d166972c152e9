"""Fit EK-FAC factors: a covariance pass, eigendecompositions, a corrected-eigenvalue pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution.curvature.accumulators import CovarianceSums, EigenvalueSums
from attribution.curvature.capture import GradientCapture
from attribution.curvature.factors import (
    NEEDS_COVARIANCE_PASS,
    NEEDS_EIGENVALUE_PASS,
    ModuleFactors,
    check_strategy,
    eigenvectors,
    identity_factors,
)
from attribution.curvature.objective import normalise_fisher, pseudo_loss
from attribution.curvature.store import FactorSet, Manifest, ModuleSpec
from attribution.data.batching import TokenBatch
from attribution.models import TrackedModule

BatchSource = Callable[[], Iterable[TokenBatch]]
AllReduce = Callable[[list[torch.Tensor]], None]


@dataclass(frozen=True)
class FitConfig:
    strategy: str = "ekfac"
    fisher: str = "true"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    progress: bool = True


def _no_reduce(tensors: list[torch.Tensor]) -> None:
    """Single process: the local sums are the global sums."""


def run_pass(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batches: Iterable[TokenBatch],
    accumulator: CovarianceSums | EigenvalueSums,
    config: FitConfig,
    description: str,
) -> None:
    """One forward and backward pass per batch of the pseudo-loss, feeding ``a`` and ``ds`` to the accumulator."""
    device = next(model.parameters()).device
    fisher = normalise_fisher(config.fisher)
    current_mask: list[torch.Tensor] = []

    def accumulate(module: TrackedModule, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        accumulator.add(module, activations, gradients, current_mask[0])

    with GradientCapture(model, tracked, accumulate, dtype=config.dtype):
        for batch in tqdm(batches, desc=description, unit="batch", disable=not config.progress):
            batch = batch.to(device)
            current_mask[:] = [batch.attention_mask.bool()]
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            pseudo_loss(logits, batch, fisher, config.seed).backward()
            accumulator.count(current_mask[0])


def fit_factors(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batches: BatchSource,
    config: FitConfig,
    model_fingerprint: str,
    data_description: dict,
    all_reduce: AllReduce = _no_reduce,
) -> FactorSet:
    """Factors of every tracked module for ``config.strategy``; ``batches()`` is iterated once per pass.

    ``all_reduce`` sums tensors in place across workers after each pass.
    """
    strategy = check_strategy(config.strategy)
    device = next(model.parameters()).device
    specs = [ModuleSpec.of(m) for m in tracked]
    num_tokens = num_sequences = 0
    if not NEEDS_COVARIANCE_PASS[strategy]:
        modules = {m.name: identity_factors(m.d_in_augmented, m.d_out, config.dtype, device) for m in tracked}
    else:
        covariances = CovarianceSums(tracked, config.dtype, device)
        run_pass(model, tracked, batches(), covariances, config, "covariance pass")
        all_reduce(covariances.tensors())
        num_tokens, num_sequences = int(covariances.num_tokens.item()), int(covariances.num_sequences.item())
        activation, gradient = covariances.means()
        modules = {m.name: _eigen_factors(activation[m.name], gradient[m.name], strategy, config.dtype) for m in tracked}
        if NEEDS_EIGENVALUE_PASS[strategy]:
            eigenvalues = EigenvalueSums(
                tracked,
                {name: f.activation_eigenvectors for name, f in modules.items()},
                {name: f.gradient_eigenvectors for name, f in modules.items()},
            )
            run_pass(model, tracked, batches(), eigenvalues, config, "eigenvalue pass")
            all_reduce(eigenvalues.tensors())
            for name, corrected in eigenvalues.means().items():
                modules[name].corrected_eigenvalues = corrected
    manifest = Manifest(
        strategy=strategy,
        fisher=normalise_fisher(config.fisher),
        model_fingerprint=model_fingerprint,
        modules=specs,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        data=data_description,
        dtype=str(config.dtype).removeprefix("torch."),
    )
    return FactorSet(manifest, modules)


def _eigen_factors(activation: torch.Tensor, gradient: torch.Tensor, strategy: str, dtype: torch.dtype) -> ModuleFactors:
    """Eigenbases for ekfac/kfac, identity bases for diagonal; Lambda is filled in here only for kfac."""
    if strategy == "diagonal":
        eye_in = torch.eye(activation.shape[0], dtype=dtype, device=activation.device)
        eye_out = torch.eye(gradient.shape[0], dtype=dtype, device=gradient.device)
        placeholder = torch.zeros(gradient.shape[0], activation.shape[0], dtype=dtype, device=activation.device)
        return ModuleFactors(activation, gradient, eye_in, eye_out, placeholder)
    values_a, vectors_a = eigenvectors(activation)
    values_s, vectors_s = eigenvectors(gradient)
    # Round-off can make eigenvalues of a PSD covariance slightly negative.
    kronecker_eigenvalues = torch.outer(values_s.clamp_min(0.0), values_a.clamp_min(0.0))
    return ModuleFactors(
        activation,
        gradient,
        vectors_a.to(dtype),
        vectors_s.to(dtype),
        kronecker_eigenvalues.to(dtype),
    )
