"""Mixture-of-experts models: every expert's linear maps are tracked modules, checked against a copy of
the model that runs transformers' own eager experts, never the per-expert views.

The independent computation: per-document parameter gradients by plain ``backward()`` on that copy,
each expert's block read from the fused 3-D parameter's ``.grad`` by name and index here; EK-FAC's
eigenvalues from those gradients; an expert's input covariance from the copy's hidden states and
router choices; Gauss-Newton products by ``torch.func`` over the fused parameters.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from attribution.counterfactual.pbrf import ProximalObjective
from attribution.curvature.capture import GradientCapture
from attribution.curvature.gauss_newton import GaussNewton, use_eager_attention
from attribution.curvature.objective import pseudo_loss
from attribution.curvature.parameters import ParameterLayout
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorStoreError
from attribution.data.batching import sequence_log_prob
from attribution.models import ModelError, find_tracked_modules, model_fingerprint
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import per_sequence_gradients, query_factors
from attribution.scoring.stages import identity_factor_set
from tests.curvature.test_fit import IDS, SEQUENCES, fit
from tests.tiny import (
    MOE_ARCHITECTURES,
    make_batch,
    query_batch,
    random_sequences,
    tiny_model,
    tiny_moe_model,
)

DOCUMENTS = random_sequences(6, seed=21, min_length=3, max_length=9)
PROMPTS = [[3, 5, 7], [11, 2], [30, 31, 32, 33]]
COMPLETIONS = [[9, 10], [4], [6, 8, 12]]
EXPERT = re.compile(r"(?P<owner>.*\.experts)\.(?P<expert>\d+)\.(?P<projection>\w+)")


def with_reference(architecture: str):
    """The model with its expert views, and an untouched copy that runs transformers' eager experts."""
    model = tiny_moe_model(architecture)
    reference = copy.deepcopy(model)
    reference.set_experts_implementation("eager")
    return model, reference, find_tracked_modules(model)


def reference_gradient(reference, module) -> torch.Tensor:
    """Module ``module``'s (d_out, d_in') block of the reference's accumulated gradients."""
    parameters = dict(reference.named_parameters())
    if match := EXPERT.fullmatch(module.name):
        owner, expert = match["owner"], int(match["expert"])
        weight = parameters[f"{owner}.{match['projection']}"].grad[expert]
        weight = weight.T if reference.get_submodule(owner).is_transposed else weight
        bias = parameters.get(f"{owner}.{match['projection']}_bias")
        bias = None if bias is None else bias.grad[expert]
    else:
        weight = parameters[f"{module.name}.weight"].grad
        bias = None if parameters.get(f"{module.name}.bias") is None else parameters[f"{module.name}.bias"].grad
    assert weight.shape == (module.d_out, module.d_in)
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)


def reference_gradients(reference, tracked, batches, objective=None) -> list[dict[str, torch.Tensor]]:
    """Per batch of one: every tracked module's gradient of ``objective`` (default: the summed target log p)."""
    objective = objective or (lambda logits, batch: sequence_log_prob(logits, batch).sum())
    result = []
    for batch in batches:
        reference.zero_grad()
        objective(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch).backward()
        result.append({m.name: reference_gradient(reference, m).detach().clone() for m in tracked})
    reference.zero_grad()
    return result


def one_by_one(sequences, ids=None) -> list:
    return [make_batch([s], [i]) for s, i in zip(sequences, ids or [f"doc-{n}" for n in range(len(sequences))])]


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_the_views_compute_the_eager_experts_and_the_router_is_left_out(architecture, tmp_path):
    model, reference, tracked = with_reference(architecture)
    names = [m.name for m in tracked]
    experts = [n for n in names if ".experts." in n]
    first = "gate_up_proj"
    assert experts == [f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer in range(2) for e in range(4) for p in (first, "down_proj")]
    assert not any(re.search(r"\.(gate|router)(\.|$)", n) for n in names), names
    if architecture == "qwen2_moe":  # the shared expert and its sigmoid gate see every token: plain linear maps
        assert "model.layers.0.mlp.shared_expert.down_proj" in names and "model.layers.0.mlp.shared_expert_gate" in names
    batch = make_batch(DOCUMENTS)
    with torch.no_grad():
        expected = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        actual = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert find_tracked_modules(model) == tracked, "a second call installs nothing new"
    # The views hold no weights: the same fingerprint, and a saved model is transformers' own.
    assert model_fingerprint(model) == model_fingerprint(tiny_moe_model(architecture))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_captured_expert_gradients_equal_autograd_on_the_fused_parameters(architecture):
    """a and ds of each expert, per document of a padded batch, give the reference's gradient of its slice."""
    model, reference, tracked = with_reference(architecture)
    layout = ParameterLayout(tracked)
    captured = layout.join(per_sequence_gradients(model, tracked, make_batch(DOCUMENTS)))
    expected = torch.stack([layout.join({k: v.unsqueeze(0) for k, v in g.items()})[0]
                            for g in reference_gradients(reference, tracked, one_by_one(DOCUMENTS))])
    torch.testing.assert_close(captured, expected, rtol=1e-9, atol=1e-12)
    # weight_gradient() reads the same slices of the fused .grad
    batch = make_batch(DOCUMENTS[:1])
    model.zero_grad()
    sequence_log_prob(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch).sum().backward()
    torch.testing.assert_close(layout.join({m.name: m.weight_gradient().unsqueeze(0) for m in tracked})[0], expected[0])
    # Not vacuous: every expert has gradient somewhere, and some document routes no token to some expert.
    for module, block in zip(tracked, expected.split(layout.sizes, dim=1)):
        assert block.abs().amax() > 0, module.name
    expert_blocks = [block for m, block in zip(tracked, expected.split(layout.sizes, dim=1)) if ".experts." in m.name]
    assert any((block == 0).all(dim=1).any() for block in expert_blocks)


def dot_scores(query_gradients, document_gradients, tracked, precondition) -> torch.Tensor:
    """(Z, Q, M): sum over each module's entries of ``precondition(g_q) * g_z``."""
    return torch.tensor([[[float((precondition(m.name, q[m.name]) * z[m.name]).sum()) for m in tracked]
                          for q in query_gradients] for z in document_gradients], dtype=torch.float64)


def engine_scores(model, tracked, factors):
    precondition = Preconditioner(factors).apply
    query_set, rejected = query_factors(model, tracked, query_batch(PROMPTS, COMPLETIONS), precondition, None)
    assert rejected == []
    scorer = CandidateScorer(model, tracked, query_set, expected_tokens=8, dtype=torch.float64)
    return torch.cat([scorer.layer_scores(make_batch(DOCUMENTS[i : i + 3])) for i in (0, 3)])


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_expert_scores_sum_with_the_rest_to_the_brute_force_score(strategy):
    model, reference, tracked = with_reference("mixtral")
    factors = identity_factor_set(tracked, "test") if strategy == "identity" else fit(model)
    queries = reference_gradients(reference, tracked, [query_batch([p], [c]) for p, c in zip(PROMPTS, COMPLETIONS)])
    documents = reference_gradients(reference, tracked, one_by_one(DOCUMENTS))
    expected = dot_scores(queries, documents, tracked, Preconditioner(factors).apply)
    actual = engine_scores(model, tracked, factors)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    experts = torch.tensor([".experts." in m.name for m in tracked])
    assert expected[..., experts].abs().amax() > 1e-3 * expected.abs().amax(), "the experts' scores are checked, not rounding"
    if strategy == "identity":  # the score is the dot product of the whole gradients, experts and all
        def flat(gradients):
            return torch.cat([gradients[m.name].flatten() for m in tracked])

        dots = torch.stack([torch.stack([flat(q) @ flat(z) for q in queries]) for z in documents])
        torch.testing.assert_close(actual.sum(-1), dots, rtol=1e-8, atol=1e-12)


def test_ekfac_eigenvalues_of_the_experts_match_brute_force():
    """Lambda = mean over sequences of (Q_S^T dW_n Q_A)^2, dW_n the reference's pseudo-gradient."""
    model, reference, tracked = with_reference("mixtral")
    fitted = fit(model)
    gradients = reference_gradients(reference, tracked, one_by_one(SEQUENCES, IDS),
                                    lambda logits, batch: pseudo_loss(logits, batch, "true", seed=7))
    for module in tracked:
        factors = fitted.modules[module.name]
        rotated = torch.stack([factors.gradient_eigenvectors.T @ g[module.name] @ factors.activation_eigenvectors for g in gradients])
        expected = rotated.square().mean(0)
        torch.testing.assert_close(factors.corrected_eigenvalues, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
        assert float(expected.abs().max()) > 0, module.name


def test_an_experts_activation_covariance_counts_only_its_routed_tokens():
    """A_e = (1/N_tok) sum over tokens routed to e of a_t a_t^T: the reference's expert inputs, routed by its router."""
    model, reference, _ = with_reference("mixtral")
    fitted = fit(model)
    seen = []
    for layer in reference.model.layers:
        layer.mlp.experts.register_forward_pre_hook(lambda module, args: seen.append((module, args[0], args[1])))
    with torch.no_grad():
        for batch in one_by_one(SEQUENCES, IDS):
            reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    tokens = sum(len(s) for s in SEQUENCES)
    for layer, experts in enumerate(layer.mlp.experts for layer in reference.model.layers):
        for expert in range(4):
            inputs, inner = [], []
            for module, hidden, top_k_index in seen:
                if module is experts:
                    routed = hidden[(top_k_index == expert).any(-1)]
                    gate, up = (routed @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
                    inputs.append(routed)
                    inner.append(experts.act_fn(gate) * up)
            for projection, rows in (("gate_up_proj", torch.cat(inputs)), ("down_proj", torch.cat(inner))):
                actual = fitted.modules[f"model.layers.{layer}.mlp.experts.{expert}.{projection}"].activation_covariance
                assert 0 < len(rows) < tokens
                torch.testing.assert_close(actual, rows.T @ rows / tokens, rtol=1e-9, atol=1e-12)


def test_gauss_newton_products_over_some_experts_of_a_fused_parameter():
    """G v over experts 1 and 3 of one layer (the others stay fixed), against torch.func on the reference."""
    model, reference, _ = with_reference("mixtral")
    tracked = find_tracked_modules(model, r"layers\.1\.mlp\.experts\.[13]\.")
    assert [m.name.split("experts.")[1] for m in tracked] == ["1.gate_up_proj", "1.down_proj", "3.gate_up_proj", "3.down_proj"]
    batch = make_batch(SEQUENCES)
    operator = GaussNewton(model, tracked, [batch])
    use_eager_attention(reference)
    vectors = torch.randn(3, operator.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pieces = ParameterLayout(tracked).split(vectors)
    base = {name: p.detach() for name, p in reference.named_parameters()}

    def logits(*matrices):
        fused = dict(base)
        for module, matrix in zip(tracked, matrices):
            match = EXPERT.fullmatch(module.name)
            key = f"{match['owner']}.{match['projection']}"
            fused[key] = fused[key].index_put((torch.tensor([int(match["expert"])]),), matrix.unsqueeze(0))
        return torch.func.functional_call(reference, fused, (batch.input_ids,), {"attention_mask": batch.attention_mask}).logits[:, :-1]

    mask = batch.target_mask[:, 1:].unsqueeze(-1).to(torch.float64)
    primals = tuple(reference_slice(base, m) for m in tracked)
    for column in range(len(vectors)):
        out, jvp = torch.func.jvp(logits, primals, tuple(pieces[m.name][column] for m in tracked))
        p = torch.softmax(out, dim=-1)
        _, pullback = torch.func.vjp(logits, *primals)
        back = pullback(mask * p * (jvp - (p * jvp).sum(-1, keepdim=True)))
        expected = torch.cat([b.flatten() for b in back]) / len(batch.ids)
        torch.testing.assert_close(operator(vectors[column]), expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))


def reference_slice(parameters, module) -> torch.Tensor:
    match = EXPERT.fullmatch(module.name)
    return parameters[f"{match['owner']}.{match['projection']}"][int(match["expert"])]


def test_pbrf_moves_fused_parameters_with_each_experts_own_damping():
    model = tiny_moe_model("mixtral")
    tracked = find_tracked_modules(model, r"layers\.0\.mlp\.experts")
    damping = {m.name: 0.1 * (1 + n) for n, m in enumerate(tracked)}
    objective = ProximalObjective(model, tracked, [make_batch(SEQUENCES[:2])], damping)
    experts = objective.model.model.layers[0].mlp.experts
    # The float64 copy's fused parameters, not the model's.
    assert [id(p) for p in objective.parameters] == [id(experts.gate_up_proj), id(experts.down_proj)]
    expected = 0.0
    with torch.no_grad():
        for parameter in objective.parameters:
            parameter.add_(torch.randn(parameter.shape, dtype=parameter.dtype, generator=torch.Generator().manual_seed(1)))
        for module in tracked:
            expert, stored = int(module.name.split(".")[-2]), int(module.name.endswith("down_proj"))
            moved = objective.parameters[stored][expert] - objective.start[stored][expert]
            expected += 0.5 * damping[module.name] * float(moved.square().sum())
        assert float(objective.proximity()) == pytest.approx(expected, rel=1e-12)
    some = find_tracked_modules(model, r"layers\.0\.mlp\.experts\.[01]\.")
    with pytest.raises(ModelError, match=r"leaves out experts \[2, 3\] of the one model\.layers\.0\.mlp\.experts\.0\.gate_up_proj"):
        ProximalObjective(model, some, [make_batch(SEQUENCES[:2])], {m.name: 0.1 for m in some})


# --- every mixture-of-experts causal LM of transformers: tracked, or refused with one line ---------------

SMALL = {"hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 64, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "moe_topk": 2, "shared_expert_intermediate_size": 8, "max_position_embeddings": 64,
         "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "kv_lora_rank": 8, "q_lora_rank": 8, "decoder_sparse_step": 1,
         "mlp_layer_types": ["sparse"] * 2, "mlp_only_layers": [], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# What the generic shrink above gets wrong for some configs.
OVERRIDES = {"hunyuan_v1_moe": {"head_dim": 8}, "mimo_v2_flash": {"num_key_value_heads": 1}, "dots1": {"n_shared_experts": 1},
             "lfm2_moe": {"layer_types": ["full_attention"] * 2, "num_dense_layers": 0},
             "granitemoehybrid": {"mamba_n_heads": 2, "mamba_d_head": 16},
             "gemma4": {"enable_moe_block": True, "top_k_experts": 2, "expert_intermediate_size": 8},
             "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2, "expert_intermediate_size": 8}}
# Mixture-of-experts layouts that hooks cannot split into experts: refused.
REFUSED = {"dbrx": "transformer.blocks.0.ffn.experts", "jetmoe": "model.layers.0.mlp.input_linear",
           "llama4": "model.layers.0.feed_forward.experts", "llama4_text": "model.layers.0.feed_forward.experts",
           "longcat_flash": "model.layers.0.mlp.experts", "inkling_text": "model.layers.0.mlp.shared_experts"}
# Inkling 2 computes its block residuals in float32 whatever the model's dtype.
FLOAT32 = {"inkling2_text"}
# dots3_note's config has per-layer attributes a generic shrink cannot set.
UNBUILDABLE = {"dots3_note", "dots3_note_text"}
# Block parameters that are neither linear maps nor experts nor routers, left out like norms: state-space
# decay rates, hyper-connection mixers, relative-position tables, per-head clipping scales.
NOT_LINEAR = re.compile(r"(\.A_log|_hc\.fn|\.position_bias|\.rel_logits_proj\.proj|_l2_clip\.scale)$")


def moe_model_types() -> list[str]:
    """Causal-LM model types of transformers whose modeling code defines experts."""
    import importlib.util

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        if spec is None or spec.origin is None:
            continue
        with open(spec.origin) as source:
            code = source.read()
        if "@use_experts_implementation" in code or re.search(r"^class \w*Expert", code, re.MULTILINE):
            found.append(model_type)
    return found


def tiny_moe_of_type(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM, DbrxConfig

    if model_type == "dbrx":
        config = DbrxConfig(d_model=16, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=64,
                            attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
                            ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2})
    else:
        config = AutoConfig.for_model(model_type)
        for target in (config, getattr(config, "text_config", None)):
            for key, value in {**SMALL, **OVERRIDES.get(model_type, {})}.items():
                if target is not None and hasattr(target, key):
                    setattr(target, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(torch.float32 if model_type in FLOAT32 else torch.float64).eval()


def test_the_sweep_knows_every_mixture_of_experts_model_type():
    found = set(moe_model_types())
    assert {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"} <= found
    assert set(REFUSED) | UNBUILDABLE <= found


@pytest.mark.parametrize("model_type", [t for t in moe_model_types() if t not in UNBUILDABLE])
def test_every_expert_is_tracked_or_the_model_refused(model_type):
    """No block parameter is left out silently: each is a tracked weight or bias (an expert's slice
    of a fused one included), a router's, one dimension (norms), a convolution's, or a known non-linear one."""
    model = tiny_moe_of_type(model_type)
    if model_type in REFUSED:
        with pytest.raises(ModelError, match=rf"covers {re.escape(REFUSED[model_type])} \(\w+\), mixture-of-experts weights "
                                             "that cannot be tracked"):
            find_tracked_modules(model)
        return
    reference = copy.deepcopy(model)
    reference.set_experts_implementation("eager")
    tracked = find_tracked_modules(model)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        actual = model(input_ids=ids, use_cache=False).logits
    # Some eager experts (NemotronH, Beam) round to float32 inside: agreement to float32 precision.
    tolerance = 1e-5 if model_type in FLOAT32 else 1e-7
    torch.testing.assert_close(actual, expected, rtol=10 * tolerance, atol=tolerance * float(expected.abs().max()))
    stacked = [p for n, p in model.named_parameters() if re.search(r"\.experts\.(gate_up|up|down)_proj$", n)]
    assert stacked and sum(".experts." in m.name for m in tracked) == sum(p.shape[0] for p in stacked)
    covered = {id(piece.parameter) for m in tracked for piece in m.storage}
    routers = {f"{name}.{child}" for name, module in model.named_modules() for child in ("gate", "router")
               if hasattr(module, "experts") and hasattr(module, child)}
    assert routers and not [m.name for m in tracked if any(m.name.startswith(f"{router}.") for router in routers)]
    convolutions = {id(p) for module in model.modules() if isinstance(module, torch.nn.modules.conv._ConvNd) for p in module.parameters()}
    for name, parameter in model.named_parameters():
        if not re.search(r"\.\d+\.", name) or id(parameter) in covered | convolutions or parameter.dim() == 1:
            continue
        assert any(name.startswith(f"{router}.") for router in routers) or NOT_LINEAR.search(name), f"{name} is left out"


# --- refusals -----------------------------------------------------------------------------------------


def test_a_selection_that_leaves_the_unsupported_experts_out_is_accepted():
    model = tiny_moe_of_type("llama4")
    with pytest.raises(ModelError, match=r"^model.tracked_modules='mlp|feed_forward' covers model.layers.0.feed_forward.experts "
                                         r"\(Llama4TextExperts\), mixture-of-experts weights that cannot be tracked "
                                         r"\(gate_up_proj is one \(4, 16, 48\) tensor\): .*leave them out with a "
                                         r"model.tracked_modules regex"):
        find_tracked_modules(model, "mlp|feed_forward")
    tracked = find_tracked_modules(model, r"self_attn")
    assert tracked and all(".self_attn." in m.name for m in tracked)


def test_expert_parallel_experts_are_refused():
    model = tiny_moe_model("mixtral")
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(ModelError, match=r"^module model.layers.1.mlp.experts is sharded by expert parallelism"):
        find_tracked_modules(model)


def test_a_module_that_sees_only_some_tokens_is_refused_by_the_capture():
    """The backstop for per-expert linear modules no name gives away: their rows are not the batch's tokens."""
    model = tiny_model("llama")
    tracked = find_tracked_modules(model, r"layers\.0\.mlp\.down_proj")
    mlp = model.model.layers[0].mlp
    original, rows = mlp.forward, torch.tensor([0, 2, 5])

    def routed(hidden):  # what a per-expert module of a mixture-of-experts layer does: only its tokens
        flat = hidden.flatten(0, 1)
        return torch.zeros_like(flat).index_add(0, rows, original(flat[rows])).view_as(hidden)

    mlp.forward = routed
    batch = make_batch(DOCUMENTS[:2])
    with pytest.raises(ModelError, match=r"^module model.layers.0.mlp.down_proj saw \(3,\) positions where the batch has "
                                         r"\(2, \d+\) tokens: it sees only some of them"), \
            GradientCapture(model, tracked, lambda *args: None, dtype=torch.float64):
        sequence_log_prob(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch).sum().backward()


def test_an_expert_no_fit_token_reached_is_named_when_the_default_damping_is_zero():
    model = tiny_moe_model("mixtral")
    fitted = fit(model)
    name = "model.layers.1.mlp.experts.2.down_proj"
    fitted.modules[name].corrected_eigenvalues.zero_()  # what a fit whose sample never routes to expert 2 stores
    with pytest.raises(FactorStoreError, match=rf"^module {re.escape(name)}: damping 0.0 leaves a zero or negative eigenvalue "
                                               r"\(all are 0: no token of the fit sample reached it"):
        Preconditioner(fitted)
    assert Preconditioner(fitted, damping=1e-3).damping[name] == 1e-3
