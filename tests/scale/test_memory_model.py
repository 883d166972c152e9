"""The memory model's terms against the tensors the code actually allocates, and the stage sampler
against an allocation of known size."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from attribution.curvature.accumulators import CovarianceSums
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.curvature.store import load_factors, save_factors
from attribution.log_prob import backward_log_prob
from attribution.models import find_tracked_modules
from attribution.scale.memory_model import RunShape, head_chunk_positions, model_shape, stage_bytes
from attribution.scale.peaks import StagePeaks
from tests.tiny import make_batch, random_sequences, tiny_model


def test_the_eigen_form_and_covariance_terms_are_the_bytes_scoring_and_fitting_hold(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    tracked = find_tracked_modules(model)
    shape = model_shape(model, probe=(8, 12, 16))
    batches = [make_batch(random_sequences(4, seed=1))]
    factors = fit_factors(model, tracked, lambda: batches, FitConfig(progress=False), "test", {})
    save_factors(factors, tmp_path / "store")
    eigen_form = load_factors(tmp_path / "store", tracked, "test", covariances=False)
    held = sum(t.nbytes for f in eigen_form.modules.values() for t in f.as_dict().values())
    run = RunShape(batch=1, sequence=1, queries=1, query_batch=1, query_tokens=1, rank=1)
    predicted = stage_bytes(shape, run)
    assert predicted["load store"] - shape.weight_bytes == held
    # The covariances, then as many bytes of eigenvectors, beside the largest float64 eigendecomposition.
    covariances = sum(t.nbytes for t in CovarianceSums(tracked, torch.float32, "cpu").tensors()[:-2])
    largest_eigh = max(32 * max(m.d_in, m.d_out) ** 2 for m in shape.modules)
    assert predicted["eigendecomposition"] == shape.weight_bytes + 2 * covariances + largest_eigh
    assert shape.weight_bytes == sum(p.nbytes for p in model.parameters())


def test_the_output_layer_runs_in_the_chunks_the_model_counts():
    model = tiny_model("gpt_neox", dtype=torch.float32)
    shape = model_shape(model, probe=(8, 12, 16))
    run = RunShape(batch=2, sequence=9, chunk_bytes=5 * 4 * shape.vocabulary)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    backward_log_prob(model, make_batch(random_sequences(2, seed=0, min_length=9, max_length=9)), chunk_bytes=run.chunk_bytes)
    handle.remove()
    assert max(calls[1:]) == head_chunk_positions(shape, run) == 5  # calls[0]: the model's own pass, (B, T, H)


def test_activations_saved_per_token_grow_with_the_blocks_widths():
    narrow = model_shape(tiny_model("llama", dtype=torch.float32), (8, 12, 16))
    config = tiny_model("llama").config
    config.hidden_size, config.intermediate_size = 16, 48
    wide = model_shape(AutoModelForCausalLM.from_config(config).float(), (8, 12, 16))
    assert narrow.saved_per_token > 0
    assert 1.5 * narrow.saved_per_token < wide.saved_per_token < 6 * narrow.saved_per_token


def test_a_stage_peak_sees_an_allocation_that_is_gone_before_the_stage_ends():
    with StagePeaks(torch.device("cpu"), interval=0.001) as peaks:
        peaks.stage("allocate")
        block = torch.ones(64 * 2**20)  # 256 MiB, touched
        del block
        peaks.stage("idle")
    allocate, idle = peaks.stages
    assert allocate.peak_bytes - peaks.baseline > 0.9 * 256 * 2**20
    assert idle.peak_bytes < allocate.peak_bytes - 200 * 2**20
