"""The engine's float32, batched query factors against the float64 per-matrix path they replaced."""

from __future__ import annotations

import torch

from attribution.benchmark import gpt_neox_from_config, random_batches
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.models import find_tracked_modules
from attribution.studies.query_side import engine_factors, optimal_error, reference_factors, relative_error

CONFIG = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
          "max_position_embeddings": 64}


def setup():
    torch.manual_seed(0)
    model = gpt_neox_from_config(**CONFIG)
    tracked = find_tracked_modules(model)
    batches = random_batches(128, 2, 4, 32, seed=0)
    factors = fit_factors(model, tracked, lambda: batches, FitConfig(dtype=torch.float32, progress=False), "test", {})
    queries = random_batches(128, 1, 6, 16, seed=1)[0]
    return model, tracked, factors, queries


def test_float32_full_rank_factors_match_float64():
    model, tracked, factors, queries = setup()
    full = max(max(m.d_out, m.d_in_augmented) for m in tracked)
    _, _, exact = reference_factors(model, tracked, queries, factors, rank=full)
    engine, _ = engine_factors(model, tracked, queries, factors, rank=full)
    assert relative_error(engine, exact) < 1e-5


def test_batched_randomized_compression_is_as_good_as_the_best_rank_r():
    model, tracked, factors, queries = setup()
    for rank in (4, 8):
        reference, _, exact = reference_factors(model, tracked, queries, factors, rank)
        engine, _ = engine_factors(model, tracked, queries, factors, rank)
        floor = optimal_error(exact, rank)
        assert floor > 1e-3  # a real truncation, not an exactly low-rank matrix
        assert relative_error(engine, exact) < 1.02 * floor
        assert relative_error(reference, exact) < 1.02 * floor
