"""Fit EK-FAC factors: a covariance pass, eigendecompositions, a corrected-eigenvalue pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
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
from attribution.curvature.finite import check_covariance_sums, check_eigenvalue_sums, check_factors
from attribution.curvature.objective import normalise_fisher
from attribution.curvature.store import FactorSet, Manifest, ModuleSpec
from attribution.data.batching import TokenBatch
from attribution.log_prob import backward_log_prob
from attribution.models import TrackedModule
from attribution.progress import begin_stage, progress_bar

BatchSource = Callable[[], Iterable[TokenBatch]]


class Collective(Protocol):
    """The workers fitting one store together; ``all_reduce`` sums tensors in place across them."""

    rank: int
    world_size: int

    def all_reduce(self, tensors: list[torch.Tensor]) -> None: ...


class SingleProcess:
    """One worker: the local sums are the global sums."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        return None


@dataclass(frozen=True)
class FitConfig:
    strategy: str = "ekfac"
    fisher: str = "true"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    progress: bool = True
    # The model is sharded over the workers (FSDP): every forward gathers parameters from all
    # of them, so all must run the same number of passes.
    lockstep: bool = False


def in_lockstep(batches: Iterable[TokenBatch], collective: Collective, device: torch.device) -> Iterator[tuple[TokenBatch, bool]]:
    """``(batch, counts)`` until every worker is out of batches; a worker out before the others
    replays a ghost (its last batch, or a two-token placeholder) that contributes nothing."""
    iterator = iter(batches)
    last: TokenBatch | None = None
    while True:
        batch = next(iterator, None)
        remaining = torch.tensor([0 if batch is None else 1], device=device)
        collective.all_reduce([remaining])
        if int(remaining.item()) == 0:
            return
        if batch is not None:
            last = batch
            yield batch, True
        else:
            yield (last if last is not None else _placeholder_batch()), False


def _placeholder_batch() -> TokenBatch:
    return TokenBatch(["ghost"], [""], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                      torch.tensor([[False, True]]), [False])


def run_pass(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batches: Iterable[TokenBatch],
    accumulator: CovarianceSums | EigenvalueSums,
    config: FitConfig,
    description: str,
    collective: Collective = SingleProcess(),
) -> list[str] | None:
    """One forward and backward pass per batch of the pseudo-loss, feeding ``a`` and ``ds`` to the accumulator.

    Returns the ids of the batch that first made this worker's sums non-finite, if one did.
    The worker then stops its share there, as the sums stay non-finite whatever follows; the
    caller raises after the all-reduce, which every worker reaches (:mod:`attribution.curvature.finite`).
    A lockstep worker keeps going, as the others' forward passes gather parameters from it.
    """
    begin_stage(description)
    device = next(model.parameters()).device
    fisher = normalise_fisher(config.fisher)
    current_mask: list[torch.Tensor] = []
    counting = [True]

    def accumulate(module: TrackedModule, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        if counting[0]:
            accumulator.add(module, activations, gradients, current_mask[0])

    steps = in_lockstep(batches, collective, device) if config.lockstep else ((batch, True) for batch in batches)
    with GradientCapture(model, tracked, accumulate, dtype=config.dtype):
        for batch, counts in progress_bar(steps, description, "batch", enabled=config.progress):
            counting[0] = counts
            batch = batch.to(device)
            current_mask[:] = [batch.attention_mask.bool()]
            backward_log_prob(model, batch, sign=-1.0, fisher=fisher, seed=config.seed, tracked=tracked)
            if counts:
                accumulator.count(current_mask[0])
            if not config.lockstep and not accumulator.all_finite():
                return batch.ids
    return None


def fit_factors(
    model: PreTrainedModel,
    tracked: Sequence[TrackedModule],
    batches: BatchSource,
    config: FitConfig,
    model_fingerprint: str,
    data_description: dict,
    collective: Collective = SingleProcess(),
) -> FactorSet:
    """Factors of every tracked module for ``config.strategy``; ``batches()`` is iterated once per pass.

    With several workers, each feeds its own share of the sample through ``batches()``; the
    sums of each pass are all-reduced, and each worker eigendecomposes every
    ``world_size``-th module, shared with the others by a summing all-reduce.
    A NaN or Inf in a pass or in the factors raises :class:`~attribution.curvature.finite.NonFiniteError`
    naming the module, on every worker alike.
    """
    strategy = check_strategy(config.strategy)
    device = next(model.parameters()).device
    specs = [ModuleSpec.of(m) for m in tracked]
    num_tokens = num_sequences = 0
    if not NEEDS_COVARIANCE_PASS[strategy]:
        modules = {m.name: identity_factors(m.d_in_augmented, m.d_out, config.dtype, device) for m in tracked}
    else:
        covariances = CovarianceSums(tracked, config.dtype, device)
        seen_in = run_pass(model, tracked, batches(), covariances, config, "covariance pass", collective)
        collective.all_reduce(covariances.tensors())
        check_covariance_sums(covariances, seen_in)
        num_tokens, num_sequences = int(covariances.num_tokens.item()), int(covariances.num_sequences.item())
        activation, gradient = covariances.means()
        begin_stage("eigendecomposition")
        modules = {
            m.name: _eigen_factors(activation[m.name], gradient[m.name], strategy, config.dtype,
                                   compute=index % collective.world_size == collective.rank)
            for index, m in enumerate(tracked)
        }
        collective.all_reduce([t for f in modules.values() for t in (f.activation_eigenvectors, f.gradient_eigenvectors, f.corrected_eigenvalues)])
        if NEEDS_EIGENVALUE_PASS[strategy]:
            eigenvalues = EigenvalueSums(
                tracked,
                {name: f.activation_eigenvectors for name, f in modules.items()},
                {name: f.gradient_eigenvectors for name, f in modules.items()},
            )
            seen_in = run_pass(model, tracked, batches(), eigenvalues, config, "eigenvalue pass", collective)
            collective.all_reduce(eigenvalues.tensors())
            check_eigenvalue_sums(eigenvalues, seen_in)
            for name, corrected in eigenvalues.means().items():
                modules[name].corrected_eigenvalues = corrected
    # With finite sums, what can still overflow factors.dtype is kfac's eigenvalue products.
    check_factors(modules, "fitted factors")
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


def _eigen_factors(activation: torch.Tensor, gradient: torch.Tensor, strategy: str, dtype: torch.dtype, compute: bool) -> ModuleFactors:
    """Eigenbases for ekfac/kfac, identity bases for diagonal; Lambda is filled in here only for kfac
    (ekfac's comes from the eigenvalue pass: an empty placeholder until then).

    A worker that does not own the module returns zeros in their place, for the summing all-reduce.
    """
    d_in, d_out = activation.shape[0], gradient.shape[0]
    like = {"dtype": dtype, "device": activation.device}
    eigenvalue_shape = (d_out, d_in) if strategy == "kfac" else (0,)
    if not compute:
        return ModuleFactors(activation, gradient, torch.zeros(d_in, d_in, **like), torch.zeros(d_out, d_out, **like),
                             torch.zeros(eigenvalue_shape, **like))
    if strategy == "diagonal":
        return ModuleFactors(activation, gradient, torch.eye(d_in, **like), torch.eye(d_out, **like), torch.zeros(0, **like))
    values_a, vectors_a = eigenvectors(activation)
    values_s, vectors_s = eigenvectors(gradient)
    kronecker_eigenvalues = torch.zeros(0, **like)
    if strategy == "kfac":
        # Round-off can make eigenvalues of a PSD covariance slightly negative. In the factor dtype: a
        # float64 (d_out, d_in') product would be the largest temporary of the fit.
        kronecker_eigenvalues = torch.outer(values_s.clamp_min(0.0).to(dtype), values_a.clamp_min(0.0).to(dtype))
    return ModuleFactors(
        activation,
        gradient,
        vectors_a.to(dtype),
        vectors_s.to(dtype),
        kronecker_eigenvalues,
    )
