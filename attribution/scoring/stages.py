"""Which model gives the query gradients, which the candidate gradients, and what preconditions between them.

Single stage: ``I(q, z) = grad m(q)^T (G + lambda I)^{-1} grad log p(z)``, one model.
Multi-stage (Bao et al. 2025):

    I(q, z) = grad m(q; theta_ft)^T (G_ft + lambda_ft I)^{-1} (G_pt + lambda_pt I)^{-1} grad log p(z; theta_pt).

Both inverses are symmetric, so both go on the query side,
``P_q = (G_pt + lambda_pt I)^{-1} (G_ft + lambda_ft I)^{-1} grad m(q; theta_ft)``, and the
candidate hot path is the single-stage one on the pretrained model. Each inverse is the EK-FAC
closed form or, with ``refine.method``, refined on its own stage's model and data
(:mod:`attribution.refine.inverse`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attribution.curvature.factors import identity_factors
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet, Manifest, ModuleSpec, load_factors
from attribution.data.batching import TokenBatch
from attribution.data.corpus import Skip
from attribution.distributed.sharded_load import load_worker_model
from attribution.models import TrackedModule
from attribution.refine.inverse import StageInverse, chain
from attribution.refine.sample import sample_batches, sample_path
from attribution.scoring.query_factors import (
    ModuleQueryFactors,
    QueryFactors,
    compress,
    concatenate,
    each_token_gradient,
    factorise,
    per_token_gradients,
)
from attribution.settings import (
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    RefineSettings,
    SettingsError,
    torch_dtype,
)

# Query-side memory: the rows of one module's (rows, d_out, d_in') gradients in the eigenbasis taken
# together; 512 MiB is 2 queries of a 14,336 x 4,096 map in float32, 16 of an 8,192 x 2,048 one.
QUERY_CHUNK_BYTES = 512 * 2**20


def query_rows(d_out: int, d_in: int, element_bytes: int, chunk_bytes: int = QUERY_CHUNK_BYTES) -> int:
    """Queries whose (d_out, d_in') matrices fit in ``chunk_bytes`` together; at least one."""
    return max(1, chunk_bytes // (d_out * d_in * element_bytes))


def finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(Q,): whether every entry of each row's slice is finite."""
    return torch.isfinite(tensor).flatten(1).all(1)


def zero_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the rows where ``keep`` is false set to zero."""
    return torch.where(keep.view(-1, *[1] * (tensor.dim() - 1)), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


@dataclass
class QueryBatchFactors:
    """One query batch's factors, the queries left out (non-finite gradients) and, per query and
    stage, how its inverse product was obtained (JSON-able: method, Gauss-Newton products,
    relative residual, fallback)."""

    factors: QueryFactors
    rejected: list[str]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stages:
    """Everything the scoring loop needs to know about models and preconditioning.

    ``inverses`` are applied to the query gradients in order (fine-tuned stage first).
    """

    candidate_model: PreTrainedModel
    candidate_tokenizer: PreTrainedTokenizerBase
    query_model: PreTrainedModel
    query_tokenizer: PreTrainedTokenizerBase
    tracked: list[TrackedModule]  # candidate side, in layer-score order
    query_tracked: list[TrackedModule]  # same names, on the query model
    inverses: list[StageInverse]
    method: str
    fingerprints: dict[str, str]
    damping: dict[str, dict[str, float]]
    excluded_modules: list[dict[str, str]] = field(default_factory=list)
    # Per refined stage: the sample it was refined on (path, sequences, skips).
    refinement: dict[str, Any] = field(default_factory=dict)

    def release_curvature(self) -> None:
        """Let every stage's factors go until a query batch needs them again: the candidate pass reads only
        the queries' rank-r factors."""
        for inverse in self.inverses:
            inverse.preconditioner.release()

    def query_factors(self, batch: TokenBatch, rank: int | None) -> QueryBatchFactors:
        """Preconditioned, rank-r compressed query gradients of one batch (on the query model's device).

        Closed form: each module's gradient goes into the (last) stage's Kronecker eigenbasis from its
        per-token factors, is divided there, compressed, and only its rank-r factors are rotated
        back. Refined: the full gradients are solved for ``refine.columns`` queries at a time
        (:mod:`attribution.refine`), each group compressed before the next is formed, so the solver's
        (Q, P) vectors never hold more than that many queries.
        """
        device = next(self.query_model.parameters()).device
        if all(inverse.sample is None for inverse in self.inverses):
            return self._closed_form_factors(batch.to(device), rank)
        tokens = per_token_gradients(self.query_model, self.query_tracked, batch.to(device), self.inverses[0].dtype)
        finite = torch.ones(len(batch.ids), dtype=torch.bool, device=device)
        for output_gradients, activations in tokens.values():
            finite &= finite_rows(output_gradients) & finite_rows(activations)
        kept = [query_id for query_id, ok in zip(batch.ids, finite.tolist()) if ok]
        rejected = [query_id for query_id, ok in zip(batch.ids, finite.tolist()) if not ok]
        if not kept:
            return QueryBatchFactors(QueryFactors([], {}), rejected)
        layout = ParameterLayout(self.query_tracked)
        rows = finite.nonzero().squeeze(1)
        width = min(inverse.settings.columns for inverse in self.inverses)
        parts, unusable, diagnostics = [], [], []
        for start in range(0, len(kept), width):
            group = rows[start:start + width]
            gradients = layout.join({name: ds[group].mT @ a[group] for name, (ds, a) in tokens.items()})
            solutions, solved = chain(self.inverses, gradients, kept[start:start + width])
            del gradients
            part, failed = factorise(kept[start:start + width], layout.split(solutions), rank)
            parts.append(part)
            unusable += failed
            diagnostics += solved
        return QueryBatchFactors(concatenate(parts), rejected + unusable, diagnostics)

    def _closed_form_factors(self, batch: TokenBatch, rank: int | None) -> QueryBatchFactors:
        """The closed form module by module, inside the backward pass: a module's per-token factors are
        rotated, divided and compressed as autograd produces them, ``query_rows`` queries at a time, so
        the largest query-side tensor is one chunk's (rows, d_out, d_in') in the eigenbasis, never every
        module's gradients. A query whose gradient or preconditioned gradient is not finite anywhere
        is left out (its rows are zeroed, so they cannot break the batched compression)."""
        last = self.inverses[-1].preconditioner
        dtype = self.inverses[0].dtype
        finite = torch.ones(len(batch.ids), dtype=torch.bool, device=batch.input_ids.device)
        modules: dict[str, ModuleQueryFactors] = {}

        def compress_module(name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> None:
            usable = finite_rows(output_gradients) & finite_rows(activations)
            output_gradients, activations = zero_rows(output_gradients, usable), zero_rows(activations, usable)
            step = query_rows(output_gradients.shape[-1], activations.shape[-1], dtype.itemsize)
            lefts, rights = [], []
            for start in range(0, len(usable), step):
                rows = slice(start, start + step)
                rotated = self._closed_form_in_eigenbasis(name, output_gradients[rows], activations[rows])
                usable[rows] &= finite_rows(rotated)
                compressed = compress(zero_rows(rotated, usable[rows]), rank)
                left, right = last.factors_from_eigenbasis(name, compressed.left, compressed.right)
                lefts.append(left)
                rights.append(right)
            modules[name] = ModuleQueryFactors(torch.cat(lefts), torch.cat(rights))
            finite.logical_and_(usable)

        each_token_gradient(self.query_model, self.query_tracked, batch, compress_module, dtype)
        kept = [query_id for query_id, ok in zip(batch.ids, finite.tolist()) if ok]
        rejected = [query_id for query_id, ok in zip(batch.ids, finite.tolist()) if not ok]
        if not kept:
            return QueryBatchFactors(QueryFactors([], {}), rejected)
        return QueryBatchFactors(QueryFactors(kept, {name: factors.rows(finite) for name, factors in modules.items()}), rejected)

    def _closed_form_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """Every stage's closed-form inverse in turn, ending in the last stage's eigenbasis."""
        first = self.inverses[0].preconditioner
        solved = first.divide(name, first.tokens_to_eigenbasis(name, output_gradients, activations))
        previous = first
        for inverse in self.inverses[1:]:
            current = inverse.preconditioner
            solved = current.divide(name, current.to_eigenbasis(name, previous.from_eigenbasis(name, solved)))
            previous = current
        return solved


def build_stages(
    model_settings: ModelSettings,
    factor_settings: FactorSettings,
    finetune_settings: FinetuneSettings,
    refine_settings: RefineSettings,
    output_dir: Path,
    device: torch.device,
    sharding: str = "none",
    product_workers: dict[str, list] | None = None,
) -> Stages:
    """Models, stores and query-side inverses of a score run: single- or multi-stage; ``sharding``
    (``cluster.sharding``) shards every model over the process group of this run's workers;
    ``product_workers`` (``refine.workers``, per stage name) take the refined stages' Gauss-Newton products."""
    if finetune_settings.enabled:
        return multi_stage(model_settings, finetune_settings, factor_settings, refine_settings, output_dir, device, sharding,
                           product_workers)
    return single_stage(model_settings, factor_settings, refine_settings, output_dir, device, sharding, product_workers)


def identity_factor_set(tracked: list[TrackedModule], fingerprint: str) -> FactorSet:
    """The gradient dot product needs no fitted store."""
    manifest = Manifest("identity", "true", fingerprint, [ModuleSpec.of(m) for m in tracked], 0, 0, {}, "float64")
    return FactorSet(manifest, {m.name: identity_factors(m.d_in_augmented, m.d_out, torch.float64, "cpu") for m in tracked})


def load_factor_set(settings: FactorSettings, path: str | Path, tracked: list[TrackedModule], fingerprint: str) -> FactorSet:
    """The store to precondition with; ``factors.strategy=identity`` needs none."""
    if settings.strategy == "identity":
        return identity_factor_set(tracked, fingerprint)
    factors = load_factors(path, tracked, fingerprint, covariances=False)
    if factors.manifest.strategy != settings.strategy:
        raise SettingsError(f"factor store {path} holds {factors.manifest.strategy} factors, but factors.strategy={settings.strategy}")
    return factors


def stage_inverse(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tracked: list[TrackedModule],
    factors: FactorSet,
    damping: float | None,
    refine: RefineSettings,
    sample_key: str,
    sample_path_setting: str | None,
    refinement: dict[str, Any],
    reload: Callable[[], FactorSet] | None = None,
) -> StageInverse:
    """One stage's inverse, with its refinement sample read when ``refine.method`` asks for one; ``reload``
    reads the factors again after :meth:`Stages.release_curvature`."""
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    preconditioner = Preconditioner(factors, damping, next(model.parameters()).device, dtype, reload)
    sample = None
    if refine.enabled:
        if factors.manifest.strategy == "identity":
            raise SettingsError(f"refine.method={refine.method} needs a fitted factor store (factors.strategy=ekfac, kfac "
                                "or diagonal): the gradient dot product has no damping to solve with")
        path = sample_path(sample_path_setting, factors.manifest, sample_key)
        skips: list[Skip] = []
        max_length = refine.max_length or int(factors.manifest.data.get("max_length") or 128)
        sample = sample_batches(tokenizer, path, max_length, refine.batch_size, refine.max_sequences, skips.append, sample_key)
        refinement[name] = {
            "path": path,
            "sequences": sum(len(batch.ids) for batch in sample),
            "max_length": max_length,
            "skipped": [asdict(skip) for skip in skips],
        }
    return StageInverse(name, model, tracked, preconditioner, refine, sample)


def single_stage(model_settings: ModelSettings, factor_settings: FactorSettings, refine: RefineSettings, output_dir: Path,
                 device: torch.device, sharding: str = "none", product_workers: dict[str, list] | None = None) -> Stages:
    model, tokenizer, fingerprint, tracked = _load(model_settings.path, model_settings, device, sharding)
    store = factor_settings.store_path(output_dir)
    factors = load_factor_set(factor_settings, store, tracked, fingerprint)
    refinement: dict[str, Any] = {}
    inverse = stage_inverse("model", model, tokenizer, tracked, factors, factor_settings.damping, refine, "refine.data_path",
                            refine.data_path, refinement, lambda: load_factor_set(factor_settings, store, tracked, fingerprint))
    _products_on_workers(inverse, (product_workers or {}).get("model"), model_settings.path, model_settings, fingerprint,
                         refinement, "refine.data_path")
    return Stages(model, tokenizer, model, tokenizer, tracked, tracked, [inverse], factors.manifest.strategy,
                  {"model": fingerprint}, {"model": inverse.preconditioner.damping}, refinement=refinement)


def multi_stage(
    model_settings: ModelSettings,
    finetune_settings: FinetuneSettings,
    factor_settings: FactorSettings,
    refine: RefineSettings,
    output_dir: Path,
    device: torch.device,
    sharding: str = "none",
    product_workers: dict[str, list] | None = None,
) -> Stages:
    """Query side on the fine-tuned model, candidates on the pretrained one, over the modules both share."""
    pretrained, pretrained_tokenizer, pretrained_fingerprint, pretrained_tracked = _load(model_settings.path, model_settings,
                                                                                        device, sharding)
    finetuned, finetuned_tokenizer, finetuned_fingerprint, finetuned_tracked = _load(finetune_settings.model_path,
                                                                                    model_settings, device, sharding)
    if pretrained.config.model_type != finetuned.config.model_type:
        raise SettingsError(
            f"fine-tuned model {finetune_settings.model_path} ({finetuned.config.model_type}) is not a descendant of "
            f"pretrained model {model_settings.path} ({pretrained.config.model_type})"
        )
    tracked, query_tracked, excluded = shared_modules(pretrained_tracked, finetuned_tracked)
    if not tracked:
        raise SettingsError(f"fine-tuned model {finetune_settings.model_path} shares no tracked module with {model_settings.path}")
    fingerprints = {"model": pretrained_fingerprint, "finetuned_model": finetuned_fingerprint}
    pretrained_store = factor_settings.store_path(output_dir)
    pretrained_factors = load_factor_set(factor_settings, pretrained_store, tracked, fingerprints["model"])
    finetuned_factors = load_factor_set(factor_settings, finetune_settings.factors_path, query_tracked, fingerprints["finetuned_model"])
    refinement: dict[str, Any] = {}
    finetuned_inverse = stage_inverse(
        "finetuned_model", finetuned, finetuned_tokenizer, query_tracked, finetuned_factors, finetune_settings.damping, refine,
        "refine.finetune_data_path", refine.finetune_data_path, refinement,
        lambda: load_factor_set(factor_settings, finetune_settings.factors_path, query_tracked, fingerprints["finetuned_model"]))
    pretrained_inverse = stage_inverse(
        "model", pretrained, pretrained_tokenizer, tracked, pretrained_factors, factor_settings.damping, refine, "refine.data_path",
        refine.data_path, refinement, lambda: load_factor_set(factor_settings, pretrained_store, tracked, fingerprints["model"]))
    workers = product_workers or {}
    _products_on_workers(finetuned_inverse, workers.get("finetuned_model"), finetune_settings.model_path, model_settings,
                         fingerprints["finetuned_model"], refinement, "refine.finetune_data_path")
    _products_on_workers(pretrained_inverse, workers.get("model"), model_settings.path, model_settings, fingerprints["model"],
                         refinement, "refine.data_path")
    method = "multi_stage_identity" if factor_settings.strategy == "identity" else "multi_stage"
    damping = {"model": pretrained_inverse.preconditioner.damping, "finetuned_model": finetuned_inverse.preconditioner.damping}
    return Stages(pretrained, pretrained_tokenizer, finetuned, finetuned_tokenizer, tracked, query_tracked,
                  [finetuned_inverse, pretrained_inverse], method, fingerprints, damping, excluded, refinement)


def _products_on_workers(inverse: StageInverse, workers: list | None, model_path: str | None, model_settings: ModelSettings,
                         fingerprint: str, refinement: dict[str, Any], key: str) -> None:
    """Hand a refined stage's whole-sample Gauss-Newton products to its ``refine.workers`` (none: this process)."""
    if not workers or inverse.sample is None:
        return
    from attribution.refine.product_pool import ProductSource, RemoteGaussNewton

    assert model_path is not None
    record = refinement[inverse.name]
    source = ProductSource(model_path, model_settings, fingerprint, tuple(m.name for m in inverse.tracked), record["path"],
                           record["max_length"], inverse.settings.batch_size, inverse.settings.max_sequences,
                           inverse.settings.cached_sequences, key)
    inverse.products = RemoteGaussNewton(workers, source, len(inverse.sample), inverse.sample_sequences, inverse.layout.size,
                                         inverse.device)


def shared_modules(
    pretrained: list[TrackedModule], finetuned: list[TrackedModule]
) -> tuple[list[TrackedModule], list[TrackedModule], list[dict[str, str]]]:
    """Modules present with the same shape in both models, and the others with why they are left out."""
    by_name = {m.name: m for m in finetuned}
    kept_pretrained, kept_finetuned, excluded = [], [], []
    for module in pretrained:
        other = by_name.pop(module.name, None)
        if other is None:
            excluded.append({"module": module.name, "reason": "not in the fine-tuned model"})
        elif ModuleSpec.of(other) != ModuleSpec.of(module):
            excluded.append({"module": module.name, "reason": f"shape differs: pretrained {ModuleSpec.of(module)}, fine-tuned {ModuleSpec.of(other)}"})
        else:
            kept_pretrained.append(module)
            kept_finetuned.append(other)
    excluded += [{"module": name, "reason": "not in the pretrained model"} for name in by_name]
    return kept_pretrained, kept_finetuned, excluded


def _load(path: str | None, settings: ModelSettings, device: torch.device,
          sharding: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, list[TrackedModule]]:
    """The model as this worker holds it (``cluster.sharding``), its tokenizer, fingerprint and tracked modules."""
    if path is None:
        raise SettingsError("a model path is required")
    loaded, tracked = load_worker_model(path, settings.trust_remote_code, torch_dtype(settings.dtype), device, sharding,
                                        settings.tracked_modules)
    return loaded.model, loaded.tokenizer, loaded.fingerprint, tracked
