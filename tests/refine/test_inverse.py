"""Refined inverse products against dense solves with the explicit Gauss-Newton matrix, single and two-stage."""

from __future__ import annotations

import pytest
import torch

from attribution.curvature.gauss_newton import GaussNewton, dense_gauss_newton
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.models import find_tracked_modules
from attribution.refine.inverse import StageInverse
from attribution.scoring.query_factors import per_sequence_gradients
from attribution.scoring.stages import Stages
from attribution.settings import RefineSettings
from tests.curvature.test_fit import SEQUENCES, fit
from tests.scoring.test_engine import COMPLETIONS, PROMPTS
from tests.scoring.test_multi_stage import finetuned_copy
from tests.tiny import make_batch, query_batch, tiny_model

SAMPLE = [make_batch(SEQUENCES[:3], [f"s{i}" for i in range(3)]), make_batch(SEQUENCES[3:], [f"s{i}" for i in range(3, 6)])]
FINETUNE_SAMPLE = [query_batch(PROMPTS, COMPLETIONS, [f"f{i}" for i in range(len(PROMPTS))])]
# "Enough steps" for a relative error below 1e-6 at these dampings (the random tiny models' curvature
# spans many decades; the heavy-ball iteration needs the better-conditioned system to get there in
# a test's time). The stochastic method's one mini-batch holds the whole sample, so its iteration is
# deterministic and converges to the same solution.
EXACT = {"cg": RefineSettings(method="cg", steps=150, tolerance=1e-9),
         "stochastic": RefineSettings(method="stochastic", steps=400, batch_size=len(SEQUENCES), momentum=0.9)}
DAMPING = {"cg": 0.05, "stochastic": 1.0}


def dense_solution(model, tracked, sample, preconditioner, vectors) -> torch.Tensor:
    """``(G + D)^{-1} v`` with the explicit G of ``sample`` and the preconditioner's per-module damping D."""
    layout = ParameterLayout(tracked)
    matrix = dense_gauss_newton(GaussNewton(model, tracked, sample))
    matrix += torch.diag(preconditioner.damping_vector(layout))
    return torch.linalg.solve(matrix, vectors.T.to(torch.float64)).T


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm(dim=1) / expected.norm(dim=1)).max())


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama", "gpt2"])
def test_refined_cg_equals_the_dense_solve(architecture):
    model = tiny_model(architecture)
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(fit(model), damping=DAMPING["cg"])
    gradients = ParameterLayout(tracked).join(per_sequence_gradients(model, tracked, query_batch(PROMPTS, COMPLETIONS)))
    inverse = StageInverse("model", model, tracked, preconditioner, EXACT["cg"], SAMPLE)
    refined, diagnostics = inverse(gradients, [f"q{i}" for i in range(len(PROMPTS))])
    expected = dense_solution(model, tracked, SAMPLE, preconditioner, gradients)
    assert relative_error(refined, expected) < 1e-6
    closed = inverse.closed_form(gradients)
    assert relative_error(closed, expected) > 1e-2  # the closed form is an approximation: the test can fail
    assert [d["status"] for d in diagnostics] == ["converged"] * len(PROMPTS)
    assert all(d["relative_residual"] <= 1e-9 and d["gauss_newton_products"] > 0 for d in diagnostics)


def test_stochastic_iteration_on_one_whole_batch_equals_the_dense_solve():
    model = tiny_model("gpt_neox")
    tracked = find_tracked_modules(model)
    preconditioner = Preconditioner(fit(model), damping=DAMPING["stochastic"])
    gradients = ParameterLayout(tracked).join(per_sequence_gradients(model, tracked, query_batch(PROMPTS, COMPLETIONS)))
    whole = [make_batch(SEQUENCES, [f"s{i}" for i in range(len(SEQUENCES))])]
    inverse = StageInverse("model", model, tracked, preconditioner, EXACT["stochastic"], whole)
    refined, diagnostics = inverse(gradients, [f"q{i}" for i in range(len(PROMPTS))])
    assert relative_error(refined, dense_solution(model, tracked, whole, preconditioner, gradients)) < 1e-6
    # 400 steps, the final residual check and the two products comparing it with the closed form.
    assert [d["gauss_newton_products"] for d in diagnostics] == [400 + 1 + 2] * len(diagnostics), diagnostics
    assert all(d["sequence_products"] == 403 * len(SEQUENCES) for d in diagnostics)
    assert not any(d["fallback"] for d in diagnostics)


@pytest.mark.parametrize("method", ["cg", "stochastic"])
def test_two_stage_refinement_equals_chained_dense_solves(method):
    pretrained = tiny_model("gpt_neox")
    finetuned = finetuned_copy(pretrained)
    tracked_pt, tracked_ft = find_tracked_modules(pretrained), find_tracked_modules(finetuned)
    pt_inverse = Preconditioner(fit(pretrained), damping=DAMPING[method])
    ft_inverse = Preconditioner(fit(finetuned), damping=2 * DAMPING[method])
    pt_sample = SAMPLE if method == "cg" else [make_batch(SEQUENCES, [f"s{i}" for i in range(len(SEQUENCES))])]
    settings = EXACT[method]
    stages = Stages(pretrained, None, finetuned, None, tracked_pt, tracked_ft,
                    [StageInverse("finetuned_model", finetuned, tracked_ft, ft_inverse, settings, FINETUNE_SAMPLE),
                     StageInverse("model", pretrained, tracked_pt, pt_inverse, settings, pt_sample)],
                    "multi_stage", {}, {})
    queries = query_batch(PROMPTS, COMPLETIONS)
    prepared = stages.query_factors(queries, None)
    layout = ParameterLayout(tracked_pt)
    actual = layout.join({name: factors.dense() for name, factors in prepared.factors.modules.items()})

    gradients = ParameterLayout(tracked_ft).join(per_sequence_gradients(finetuned, tracked_ft, queries))
    finetuned_step = dense_solution(finetuned, tracked_ft, FINETUNE_SAMPLE, ft_inverse, gradients)
    expected = dense_solution(pretrained, tracked_pt, pt_sample, pt_inverse, finetuned_step)
    assert relative_error(actual, expected) < 1e-6
    assert {d["stage"] for d in prepared.diagnostics} == {"finetuned_model", "model"}
    assert len(prepared.diagnostics) == 2 * len(PROMPTS)
