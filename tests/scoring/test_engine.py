"""The scoring engine against brute force: per-sample autograd gradients and explicit preconditioning."""

from __future__ import annotations

import pytest
import torch

from attribution.curvature.precondition import Preconditioner
from attribution.data.batching import sequence_log_prob
from attribution.models import find_tracked_modules
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.contraction import ModuleContraction, choose_contraction, gradient_square_norms, plan_contractions
from attribution.scoring.query_factors import ModuleQueryFactors, compress, query_factors
from attribution.scoring.stages import identity_factor_set
from tests.curvature.test_fit import fit
from tests.tiny import make_batch, query_batch, random_sequences, tiny_model

DOCUMENTS = random_sequences(5, seed=11)
PROMPTS = [s[:3] for s in random_sequences(4, seed=12, min_length=4)]
COMPLETIONS = [s[:2] for s in random_sequences(4, seed=13, min_length=2)]


def autograd_gradient(model, tracked, batch):
    """Weight gradients of sum over targets of log p, by plain autograd on a batch of one."""
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sequence_log_prob(logits, batch).sum().backward()
    return {m.name: m.weight_gradient().detach().clone() for m in tracked}


def brute_force_scores(model, factors, damping=None):
    """I(q, z) = sum_m <(G_m + lambda I)^{-1} g_q, g_z>, per module, each gradient alone: (Z, Q, M)."""
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(factors, damping)
    queries = [autograd_gradient(model, tracked, query_batch([p], [c])) for p, c in zip(PROMPTS, COMPLETIONS)]
    documents = [autograd_gradient(model, tracked, make_batch([d])) for d in DOCUMENTS]
    scores = torch.zeros(len(documents), len(queries), len(tracked), dtype=torch.float64)
    for z, g_z in enumerate(documents):
        for q, g_q in enumerate(queries):
            for m, module in enumerate(tracked):
                scores[z, q, m] = (preconditioner.apply(module.name, g_q[module.name]) * g_z[module.name]).sum()
    return scores


def engine_scores(model, factors, rank=None, damping=None, batch_size=2, normalize=False):
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(factors, damping)
    query_set, rejected = query_factors(model, tracked, query_batch(PROMPTS, COMPLETIONS), preconditioner.apply, rank)
    assert rejected == []
    scorer = CandidateScorer(model, tracked, query_set, expected_tokens=8, dtype=torch.float64, normalize=normalize)
    chunks = [DOCUMENTS[i : i + batch_size] for i in range(0, len(DOCUMENTS), batch_size)]
    return scorer, torch.cat([scorer.layer_scores(make_batch(chunk)) for chunk in chunks])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_full_rank_scores_equal_brute_force(strategy):
    model = tiny_model("gpt_neox")
    factors = fit(model, strategy=strategy)
    expected = brute_force_scores(model, factors)
    _, actual = engine_scores(model, factors)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    assert float(expected.abs().max()) > 0


def test_identity_is_the_gradient_dot_product():
    model = tiny_model("gpt2")
    tracked = find_tracked_modules(model)
    factors = identity_factor_set(tracked, "test")
    _, actual = engine_scores(model, factors)
    q = autograd_gradient(model, tracked, query_batch([PROMPTS[1]], [COMPLETIONS[1]]))
    z = autograd_gradient(model, tracked, make_batch([DOCUMENTS[3]]))
    dot = sum(float((q[m.name] * z[m.name]).sum()) for m in tracked)
    assert actual[3, 1].sum().item() == pytest.approx(dot, rel=1e-9)


def test_low_rank_at_full_rank_equals_full_and_error_shrinks_with_rank():
    model = tiny_model("gpt_neox")
    factors = fit(model)
    _, full = engine_scores(model, factors, rank=None)
    _, at_full_rank = engine_scores(model, factors, rank=9)  # max over modules of min(d_out, d_in')
    torch.testing.assert_close(at_full_rank, full, rtol=1e-9, atol=1e-12 * float(full.abs().max()))
    errors = [float((engine_scores(model, factors, rank=r)[1] - full).abs().max()) for r in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_token_scores_and_layer_scores_sum_to_the_score():
    model = tiny_model("llama")
    factors = fit(model)
    scorer, layers = engine_scores(model, factors, rank=3)
    tokens = torch.cat([scorer.token_scores(make_batch(DOCUMENTS[i : i + 2])).sum(1) for i in range(0, len(DOCUMENTS), 2)])
    torch.testing.assert_close(tokens, layers.sum(-1), rtol=1e-9, atol=1e-12)


def test_normalized_scores_divide_by_each_documents_gradient_norm():
    """``score.normalize``: I(q, z) / ||g_z||, g_z the document's autograd gradient over every tracked module; its
    layer and token parts divided alike, so they still sum to it."""
    model = tiny_model("gpt_neox")
    factors = fit(model)
    tracked = find_tracked_modules(model)
    norms = torch.stack([sum(g.square().sum() for g in autograd_gradient(model, tracked, make_batch([d])).values()).sqrt()
                         for d in DOCUMENTS])
    expected = brute_force_scores(model, factors) / norms.view(-1, 1, 1)
    scorer, actual = engine_scores(model, factors, normalize=True)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    assert not torch.allclose(norms, torch.ones_like(norms), rtol=0.1)
    tokens = torch.cat([scorer.token_scores(make_batch(DOCUMENTS[i : i + 2])).sum(1) for i in range(0, len(DOCUMENTS), 2)])
    torch.testing.assert_close(tokens, actual.sum(-1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("tokens", "d_in", "d_out"), [(3, 9, 8), (12, 4, 5)])
def test_gradient_square_norms_by_gram_matrices_or_the_gradient(tokens, d_in, d_out):
    """Both routes (token Gram matrices for short documents of wide modules, the gradient otherwise), and every
    contraction adding the same norms."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3, tokens, d_in, generator=generator, dtype=torch.float64)
    ds = torch.randn(3, tokens, d_out, generator=generator, dtype=torch.float64)
    expected = (ds.mT @ a).square().sum((1, 2))
    torch.testing.assert_close(gradient_square_norms(a, ds), expected)
    factors = ModuleQueryFactors(torch.randn(2, d_out, 2, generator=generator, dtype=torch.float64),
                                 torch.randn(2, d_in, 2, generator=generator, dtype=torch.float64))
    for contraction in ("low_rank", "document_low_rank", "per_document"):
        squares = torch.zeros(3, dtype=torch.float64)
        ModuleContraction(factors, contraction).scores(a, ds, squares)
        torch.testing.assert_close(squares, expected)


def test_scores_do_not_depend_on_document_batching():
    model = tiny_model("bloom", dtype=torch.float64)
    factors = fit(model)
    _, one = engine_scores(model, factors, rank=4, batch_size=1)
    _, all_padded = engine_scores(model, factors, rank=4, batch_size=len(DOCUMENTS))
    torch.testing.assert_close(one, all_padded, rtol=1e-5, atol=1e-7 * float(one.abs().max()))


def test_every_contraction_computes_the_same_number_for_all_queries_or_some():
    generator = torch.Generator().manual_seed(0)
    factors = ModuleQueryFactors(torch.randn(5, 6, 3, generator=generator, dtype=torch.float64),
                                 torch.randn(5, 7, 3, generator=generator, dtype=torch.float64))
    a = torch.randn(2, 4, 7, generator=generator, dtype=torch.float64)
    ds = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    expected = torch.einsum("qoi,bto,bti->bq", factors.dense(), ds, a)
    queries = torch.tensor([3, 0])
    for contraction in ("low_rank", "document_low_rank", "per_document"):
        torch.testing.assert_close(ModuleContraction(factors, contraction).scores(a, ds), expected)
        squares = torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(ModuleContraction(factors, contraction).scores(a, ds, squares, queries), expected[:, queries])
        torch.testing.assert_close(squares, (ds.mT @ a).square().sum((1, 2)))


def test_layer_scores_of_some_queries_fill_their_columns_and_leave_the_rest_zero():
    model = tiny_model("gpt_neox", dtype=torch.float64)
    scorer, every = engine_scores(model, fit(model))
    queries = torch.tensor([len(PROMPTS) - 1, 0])
    batch = make_batch(DOCUMENTS[:2])
    some = scorer.layer_scores(batch, queries=queries)
    torch.testing.assert_close(some[:, queries], every[:2, queries])
    others = [q for q in range(len(PROMPTS)) if q not in queries.tolist()]
    assert others and not some[:, others].any()


def test_cost_model_prefers_per_document_gradients_for_many_queries():
    assert choose_contraction(d_in=257, d_out=1024, num_queries=64, rank=32, tokens=128) == "per_document"
    assert choose_contraction(d_in=257, d_out=1024, num_queries=1, rank=8, tokens=128) == "low_rank"


def test_long_documents_without_a_dense_budget_form_their_gradient():
    """At 2,048 tokens and Q r = 2,048 the document's gradient times the stacked factors takes about half the
    multiply-adds of projecting every token; with no budget for dense factors that is what the plan picks."""
    shapes = {"mlp": (768, 3072, 32), "attention": (768, 768, 32)}
    assert plan_contractions(shapes, num_queries=64, tokens=2048, element_bytes=4, budget_bytes=0) == {
        "mlp": "document_low_rank", "attention": "document_low_rank"}
    assert plan_contractions(shapes, num_queries=4, tokens=128, element_bytes=4, budget_bytes=0) == {
        "mlp": "low_rank", "attention": "low_rank"}
    assert plan_contractions(shapes, num_queries=64, tokens=2048, element_bytes=4, budget_bytes=None) == {
        "mlp": "per_document", "attention": "per_document"}


def test_compress_exact_and_randomized():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(3, 80, 4, generator=generator, dtype=torch.float64) @ torch.randn(3, 4, 60, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(compress(low_rank, None).dense(), low_rank)
    torch.testing.assert_close(compress(low_rank, 4).dense(), low_rank)  # randomized: 4 <= 0.25 x 60
    full = torch.randn(2, 30, 20, generator=generator, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(full)
    best_rank_10 = u[..., :10] @ torch.diag_embed(s[:, :10]) @ vh[:, :10]
    torch.testing.assert_close(compress(full, 10).dense(), best_rank_10)


def test_non_finite_query_gradient_is_rejected_not_scored():
    model = tiny_model("gpt_neox")
    tracked = find_tracked_modules(model)
    factors = identity_factor_set(tracked, "test")
    poisoned = PROMPTS[2][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = float("nan")
    query_set, rejected = query_factors(model, tracked, query_batch(PROMPTS, COMPLETIONS), Preconditioner(factors).apply, 2)
    assert "q-2" in rejected and "q-2" not in query_set.query_ids
    assert all(torch.isfinite(f.left).all() for f in query_set.modules.values())
