"""``jobs.validate_counterfactual finetune_stage=true`` on a tiny demo: every retrained model goes through the demo's
fine-tuning recipe and is measured on the held-out questions; methods score with the pretrained model, the
fine-tuned one, or both stages."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.counterfactual.test_job import TINY_DEMO, latest_record, pairs_by_query
from tests.jobs.helpers import run_job

STAGED_METHODS = ("~methods.refined_cg", "~methods.refined_stochastic", "~methods.kfac", "~methods.identity", "~methods.cosine",
                  "~methods.bm25_then_ekfac", "+methods.finetuned_ekfac={kind: ekfac, stage: finetuned}",
                  "+methods.multi_ekfac={kind: ekfac, stage: multi}",
                  "+methods.multi_small={kind: ekfac, stage: multi, finetune_damping: 0.01}")
RUN = ("finetune_stage=true", *STAGED_METHODS, "lds.subsets=4", "pbrf.documents=2", "damping.values=[1.0]", "damping.methods=[]",
       "refine_steps.values=[]", "removal.queries=1", "progress=false", "cluster.num_workers=0")


def validate(tmp_path: Path, *extra: str):
    result, _ = run_job("validate_counterfactual", f"output_dir={tmp_path / 'out'}", *TINY_DEMO, *RUN, *extra,
                        env={"ATTRIBUTION_CACHE": str(tmp_path / "cache")})
    return result


def test_retrained_models_are_fine_tuned_and_measured_on_the_held_out_questions(tmp_path):
    from attribution.data.queries import read_queries
    from attribution.demo.train import DemoFinetuneConfig, finetune
    from attribution.models import load_model

    first = validate(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fine-tuning stage: every query is measured on its retrained model" in first.stdout
    assert "PBRF: not solved with finetune_stage=true" in first.stdout
    record = latest_record(tmp_path)
    results = record["config"]["results"]
    assert results["pbrf"] is None
    demo = next((tmp_path / "cache" / "demo").iterdir())
    questions = [q.id for q in read_queries(demo / "finetune_queries.jsonl", on_skip=None)]
    assert results["measurements"]["query_ids"] == questions and all(q.startswith("fq") for q in questions)

    # One kept subset: its fine-tuned model is the demo's recipe applied to its pretrained model, and the
    # measurement is log p(completion | prompt) on it, summed from the logits here.
    subset = sorted((tmp_path / "out" / "retrain").glob("*/subset-0000-*"))[0]
    (tuned_dir,) = subset.glob("finetuned-*")
    assert json.loads((tuned_dir / "retrained.json").read_text())["pretrained_key"] == \
        json.loads((subset / "retrained.json").read_text())["key"]
    pretrained, tokenizer = load_model(subset)
    rows = [json.loads(line) for line in (demo / "finetune.jsonl").read_text().splitlines()]
    again, _ = finetune(pretrained, tokenizer, rows, DemoFinetuneConfig(), show_progress=False)
    tuned, _ = load_model(tuned_dir)
    for name, weight in tuned.state_dict().items():
        torch.testing.assert_close(weight, again.state_dict()[name], rtol=1e-5, atol=1e-6)
    query = read_queries(demo / "finetune_queries.jsonl", on_skip=None)[0]
    prompt = tokenizer(query.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tuned(torch.tensor([prompt + completion])).logits[0].double()
    expected = sum(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[token].item() for i, token in enumerate(completion))
    measured = results["measurements"]["by_seed_subset_query"][0][0][0]
    assert measured == pytest.approx(expected, abs=1e-4)

    # Each stage's scores come from its own model and stores; the multi-stage fine-tuned store is fitted on the
    # fine-tuning rows, damped at the given multiple of its own mean eigenvalue.
    rows_by_method = {row["method"]: row for row in results["rows"]}
    assert set(rows_by_method) == {"ekfac", "finetuned_ekfac", "multi_ekfac", "multi_small", "bm25"}
    assert all(math.isfinite(row["lds"]) for row in rows_by_method.values())
    assert rows_by_method["finetuned_ekfac"]["detail"].startswith("single-stage on the fine-tuned model")
    assert rows_by_method["multi_ekfac"]["detail"].startswith("multi-stage")
    runs = score_runs(tmp_path)
    assert {Path(r["model"]["path"]) for r in runs if r["finetune"]["model_path"] is None} == {demo / "model",
                                                                                             demo / "finetuned"}
    multi = [r for r in runs if r["finetune"]["model_path"] is not None]
    assert {Path(r["model"]["path"]) for r in multi} == {demo / "model"}
    assert {Path(r["finetune"]["model_path"]) for r in multi} == {demo / "finetuned"}
    (store,) = {Path(r["finetune"]["factors_path"]) for r in multi}
    assert store.parent.name.startswith("ekfac-finetune_rows-")
    fit = json.loads((store.parent / "fit.json").read_text())["inputs"]
    assert Path(fit["data"]["path"]) == demo / "finetune.jsonl" and Path(fit["model"]["path"]) == demo / "finetuned"
    mean = mean_eigenvalue(store, demo / "finetuned")
    assert sorted(r["finetune"]["damping"] for r in multi) == pytest.approx([0.01 * mean, 1.0 * mean], rel=1e-6)
    # Every stage's scores differ from the others': each uses its own model, stores and damping.
    scores = {name: pairs_by_query(path) for name, path in results["pairs"].items()}
    assert set(scores) == {"ekfac (1x)", "finetuned_ekfac (1x)", "multi_ekfac (1x)", "multi_small (1x)"}
    query, document = questions[0], next(iter(scores["ekfac (1x)"][questions[0]]))
    values = [scores[name][query][document] for name in sorted(scores)]
    assert len({round(v, 6) for v in values}) == 4, values

    # A rerun retrains and fine-tunes nothing, and gives the same measurements.
    rerun = validate(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again_record = latest_record(tmp_path)
    assert again_record["counts"]["models_trained"] == 0
    assert again_record["config"]["results"]["measurements"] == results["measurements"]


def score_runs(tmp_path: Path) -> list[dict]:
    """The resolved settings of every engine score run."""
    records = [json.loads(path.read_text()) for path in (tmp_path / "out" / "engine").glob("*/runs/*.json")]
    return [r["config"]["resolved_settings"] for r in records if r["job"] == "score"]


def mean_eigenvalue(store: Path, model_dir: Path) -> float:
    from attribution.curvature.store import load_factors
    from attribution.models import find_tracked_modules, load_model

    model, _ = load_model(model_dir)
    factors = load_factors(store, find_tracked_modules(model), None)
    values = [f.corrected_eigenvalues.double() for f in factors.modules.values()]
    return float(sum(v.sum() for v in values) / sum(v.numel() for v in values))


def test_a_bad_stage_setting_is_one_line_and_exit_2(tmp_path):
    result = validate(tmp_path, "+methods.dot={kind: identity, stage: multi}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "methods.dot.stage=multi" in result.stderr and "Traceback" not in result.stderr


SWEEPS_OFF = {"damping": {"methods": []}, "refine_steps": {"values": []}}


@pytest.mark.parametrize("method, message", [
    ({"kind": "identity", "stage": "multi"}, "methods.m.stage=multi: both stages are preconditioned by fitted stores"),
    ({"kind": "bm25", "stage": "finetuned"}, "methods.m.stage=finetuned: bm25 uses no model"),
    ({"kind": "ekfac", "stage": "other"}, "methods.m.stage='other': expected one of pretrained, finetuned, multi"),
    ({"kind": "ekfac", "finetune_damping": 0.1}, "methods.m.finetune_damping=0.1: only a multi-stage method"),
    ({"kind": "ekfac", "stage": "multi", "finetune_damping": -1}, "methods.m.finetune_damping=-1: expected a positive"),
    ({"kind": "ekfac", "stage": "multi", "prefilter": {"kind": "gradient"}}, "methods.m.prefilter.kind=gradient"),
])
def test_stage_settings_errors_name_the_key(method, message):
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import SettingsError

    with pytest.raises(SettingsError, match=re.escape(message)):
        CounterfactualSettings.from_config({"methods": {"m": method}, "finetune_stage": True, **SWEEPS_OFF})


def test_a_staged_method_needs_the_fine_tuning_stage():
    from attribution.counterfactual.benchmarks import prepare_benchmark
    from attribution.counterfactual.settings import CounterfactualSettings
    from attribution.settings import SettingsError

    with pytest.raises(SettingsError, match="methods.m.stage=multi: .* set finetune_stage=true"):
        CounterfactualSettings.from_config({"methods": {"m": {"kind": "ekfac", "stage": "multi"}}, **SWEEPS_OFF})
    settings = CounterfactualSettings.from_config({"methods": {"m": {"kind": "ekfac", "stage": "multi",
                                                                     "finetune_damping": 0.5}},
                                                   "finetune_stage": True, **SWEEPS_OFF})
    assert (settings.methods[0].stage, settings.methods[0].finetune_damping) == ("multi", 0.5)
    with pytest.raises(SettingsError, match="natural_text.corpus.num_finetune=0 gives the fine-tuning stage no rows"):
        prepare_benchmark("natural_text", {}, {"corpus": {"num_finetune": 0}}, finetune=True)
