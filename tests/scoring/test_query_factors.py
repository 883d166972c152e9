"""The engine's float32, batched query factors against the float64 per-matrix path they replaced."""

from __future__ import annotations

import torch

from attribution.benchmark import gpt_neox_from_config, random_batches
from attribution.curvature.fit import FitConfig, fit_factors
from attribution.models import find_tracked_modules
from attribution.curvature.precondition import Preconditioner
from attribution.refine.inverse import StageInverse
from attribution.scoring.stages import Stages
from attribution.settings import RefineSettings
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


def test_queries_taken_a_few_rows_at_a_time_give_the_same_factors_and_a_broken_one_is_left_out(monkeypatch):
    from attribution.scoring import stages

    model, tracked, factors, queries = setup()
    together, _ = engine_factors(model, tracked, queries, factors, rank=4)
    monkeypatch.setattr(stages, "QUERY_CHUNK_BYTES", 1)  # one query per chunk
    one_by_one, _ = engine_factors(model, tracked, queries, factors, rank=4)
    for name, expected in together.items():
        assert torch.allclose(one_by_one[name].dense(), expected.dense(), rtol=1e-4, atol=1e-7), name
    # A query whose gradient is NaN (a NaN embedding row of a token only it has), in one chunk with the
    # others: left out, their factors unchanged.
    monkeypatch.undo()
    others = set(queries.input_ids[1:].flatten().tolist())
    token = next(t for t in range(1, 128) if t not in others)
    queries.input_ids[0, 0] = token
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[token] = float("nan")
    preconditioner = Preconditioner(factors, None, "cpu", torch.float32)
    query_stages = Stages(model, None, model, None, list(tracked), list(tracked),
                          [StageInverse("model", model, tracked, preconditioner, RefineSettings())], "ekfac", {}, {})
    result = query_stages.query_factors(queries, 4)
    assert result.rejected == [queries.ids[0]] and result.factors.query_ids == list(queries.ids[1:])
    for name, expected in together.items():
        assert torch.allclose(result.factors.modules[name].dense(), expected.dense()[1:], rtol=1e-4, atol=1e-7), name


def test_released_factors_are_read_again_when_a_query_batch_needs_them():
    model, tracked, factors, queries = setup()
    reads = []

    def reload():
        reads.append(1)
        return factors

    preconditioner = Preconditioner(factors, None, "cpu", torch.float32, reload)
    query_stages = Stages(model, None, model, None, list(tracked), list(tracked),
                          [StageInverse("model", model, tracked, preconditioner, RefineSettings())], "ekfac", {}, {})
    before = query_stages.query_factors(queries, 4).factors
    query_stages.release_curvature()
    assert preconditioner._modules == {} and reads == []
    after = query_stages.query_factors(queries, 4).factors
    assert reads == [1] and set(preconditioner.modules) == {m.name for m in tracked}
    for name, expected in before.modules.items():
        assert torch.equal(after.modules[name].dense(), expected.dense()), name
