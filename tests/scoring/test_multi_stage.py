"""Multi-stage influence against dense solves with both stages' reconstructed EK-FAC matrices."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attribution.curvature.precondition import Preconditioner
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules
from attribution.refine.inverse import StageInverse
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.run import run_score
from attribution.scoring.stages import Stages
from attribution.settings import (
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from tests.curvature.test_fit import dense_ekfac, fit
from tests.scoring.test_engine import COMPLETIONS, DOCUMENTS, PROMPTS, autograd_gradient
from tests.tiny import make_batch, query_batch, save_tiny_lm, tiny_config, tiny_model


def finetuned_copy(model, seed=5, scale=0.05):
    """A descendant: the same architecture with every weight moved a little."""
    generator = torch.Generator().manual_seed(seed)
    child = AutoModelForCausalLM.from_config(model.config).to(torch.float64).eval()
    child.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in child.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return child


def dense_inverse(factors, damping):
    gauss_newton, _ = dense_ekfac(factors)
    return torch.linalg.inv(gauss_newton + damping * torch.eye(gauss_newton.shape[0], dtype=torch.float64))


def test_multi_stage_scores_equal_dense_solves():
    pretrained = tiny_model("gpt_neox")
    finetuned = finetuned_copy(pretrained)
    pt_factors = fit(pretrained)
    ft_factors = fit(finetuned)
    pt_inverse, ft_inverse = Preconditioner(pt_factors, damping=1e-3), Preconditioner(ft_factors, damping=None)
    tracked_pt, tracked_ft = find_tracked_modules(pretrained), find_tracked_modules(finetuned)
    inverses = [StageInverse("finetuned_model", finetuned, tracked_ft, ft_inverse, RefineSettings()),
                StageInverse("model", pretrained, tracked_pt, pt_inverse, RefineSettings())]
    stages = Stages(pretrained, None, finetuned, None, tracked_pt, tracked_ft, inverses, "multi_stage", {}, {})
    query_set = stages.query_factors(query_batch(PROMPTS, COMPLETIONS), None).factors
    scorer = CandidateScorer(pretrained, tracked_pt, query_set, expected_tokens=8, dtype=torch.float64)
    actual = scorer.layer_scores(make_batch(DOCUMENTS))

    for q, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        g_q = autograd_gradient(finetuned, tracked_ft, query_batch([prompt], [completion]))
        for z, document in enumerate(DOCUMENTS):
            g_z = autograd_gradient(pretrained, tracked_pt, make_batch([document]))
            for m, module in enumerate(tracked_pt):
                ft_lambda = 0.1 * float(ft_factors.modules[module.name].corrected_eigenvalues.mean())
                expected = (
                    g_q[module.name].flatten()
                    @ dense_inverse(ft_factors.modules[module.name], ft_lambda)
                    @ dense_inverse(pt_factors.modules[module.name], 1e-3)
                    @ g_z[module.name].flatten()
                )
                assert actual[z, q, m].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9 * abs(expected.item()) + 1e-14)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    """A saved pretrained model, a fine-tuned descendant with a replaced (wider) head, their data and stores."""
    root = tmp_path_factory.mktemp("pair")
    words = "alice bob carol dave was born in paris rome oslo lima question where answer".split()
    texts = ["alice was born in paris", "bob was born in rome", "carol was born in oslo", "dave was born in lima"]
    save_tiny_lm(root / "pt", texts + words)
    tokenizer = AutoTokenizer.from_pretrained(root / "pt")
    pretrained = AutoModelForCausalLM.from_pretrained(root / "pt")
    finetuned = AutoModelForCausalLM.from_config(pretrained.config)
    finetuned.load_state_dict(pretrained.state_dict())
    finetuned.resize_token_embeddings(len(tokenizer) + 3)  # a replaced, wider head
    finetuned.save_pretrained(root / "ft")
    tokenizer.save_pretrained(root / "ft")
    pq.write_table(pa.Table.from_pylist([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]), root / "corpus.parquet")
    qa = [{"id": f"f{i}", "prompt": f"question where was {n} born answer", "completion": f" {c}"}
          for i, (n, c) in enumerate([("alice", "paris"), ("bob", "rome")])]
    (root / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (root / "queries.jsonl").write_text(json.dumps({"id": "q0", "prompt": "question where was carol born answer", "completion": " oslo"}) + "\n")
    tracked = "mlp|lm_head"
    pt_store = run_fit(ModelSettings(path=str(root / "pt"), tracked_modules=tracked, device="cpu"),
                       DataSettings(path=str(root / "corpus.parquet")), FactorSettings(path=str(root / "pt_store")), root, {}, progress=False)
    ft_store = run_fit(ModelSettings(path=str(root / "ft"), tracked_modules=tracked, device="cpu"),
                       DataSettings(path=str(root / "finetune.jsonl")), FactorSettings(path=str(root / "ft_store")), root, {}, progress=False)
    return root, tracked, pt_store, ft_store


def test_fine_tuning_data_fits_on_completion_tokens(model_pair):
    _, _, _, ft_store = model_pair
    manifest = json.loads((ft_store.factors_path / "manifest.json").read_text())
    assert manifest["data"]["objective"] == "log p(completion | prompt)"
    assert manifest["num_sequences"] == 2


def score_multi_stage(model_pair, output_dir, refine: RefineSettings = RefineSettings()):
    """A full-rank multi-stage score run of the pair's queries, top 4, refined as ``refine`` says."""
    root, tracked, pt_store, ft_store = model_pair
    return run_score(
        ModelSettings(path=str(root / "pt"), tracked_modules=tracked, device="cpu"),
        DataSettings(path=str(root / "corpus.parquet")),
        FactorSettings(path=str(pt_store.factors_path)),
        QuerySettings(path=str(root / "queries.jsonl")),
        ScoreSettings(rank=None, top_k=4, token_scores=False, progress=False),
        output_dir, {},
        FinetuneSettings(model_path=str(root / "ft"), factors_path=str(ft_store.factors_path)),
        refine_settings=refine,
    )


def test_multi_stage_job_leaves_out_the_replaced_head(model_pair, tmp_path):
    root = model_pair[0]
    summary = score_multi_stage(model_pair, tmp_path)
    record = json.loads(summary.run_record.read_text())
    vocab = len(AutoTokenizer.from_pretrained(root / "pt"))
    assert record["config"]["excluded_modules"] == [{"module": "lm_head", "reason": (
        f"shape differs: pretrained ModuleSpec(name='lm_head', d_in=8, d_out={vocab}, bias=False), "
        f"fine-tuned ModuleSpec(name='lm_head', d_in=8, d_out={vocab + 3}, bias=False)")}]
    assert record["config"]["modules"] == ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h",
                                          "gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]
    assert set(record["fingerprints"]) == {"model", "finetuned_model"}
    table = pq.read_table(summary.scores_path)
    assert set(table["method"].to_pylist()) == {"multi_stage"} and table.num_rows == 4
    assert all(len(row) == 4 for row in table["layer_scores"].to_pylist())


def test_not_a_descendant_and_half_configured(model_pair, tmp_path):
    root, tracked, pt_store, ft_store = model_pair
    other = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    other.save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(root / "pt").save_pretrained(tmp_path / "gpt2")
    arguments = (ModelSettings(path=str(root / "pt"), device="cpu"), DataSettings(path=str(root / "corpus.parquet")),
                 FactorSettings(path=str(pt_store.factors_path)), QuerySettings(path=str(root / "queries.jsonl")),
                 ScoreSettings(progress=False), tmp_path, {})
    with pytest.raises(SettingsError, match="is not a descendant of pretrained model"):
        run_score(*arguments, FinetuneSettings(model_path=str(tmp_path / "gpt2"), factors_path=str(ft_store.factors_path)))
    with pytest.raises(SettingsError, match="needs both finetune.model_path and finetune.factors_path"):
        run_score(*arguments, FinetuneSettings(model_path=str(root / "ft")))


def test_multi_stage_refinement_uses_each_stores_own_data(model_pair, tmp_path):
    """Each stage is refined on its own store's fit data, fine-tuned stage first, and the record says so per query."""
    root = model_pair[0]
    summary = score_multi_stage(model_pair, tmp_path, RefineSettings(method="cg", steps=3))
    config = json.loads(summary.run_record.read_text())["config"]
    assert config["refinement"]["finetuned_model"]["path"] == str(root / "finetune.jsonl")
    assert config["refinement"]["model"]["path"] == str(root / "corpus.parquet")
    assert config["refinement"]["finetuned_model"]["sequences"] == 2 and config["refinement"]["model"]["sequences"] == 4
    [stages] = config["query_diagnostics"].values()
    assert [d["stage"] for d in stages] == ["finetuned_model", "model"]
    assert all(0 < d["gauss_newton_products"] <= 3 for d in stages)
