"""A DeepSpeed ZeRO checkpoint folder as ``model.path``, written by a real two-rank DeepSpeed run on the CPU.

The reference for the consolidated model is the same run's weights gathered from the ranks' live
parameters at the end of training (``deepspeed.zero.GatheredParameters``) and saved with
``save_pretrained``: a second path that never reads the checkpoint files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from attribution.models import ModelError, load_model, model_fingerprint
from jobs import fit_factors, score
from tests.jobs.helpers import ROOT, overrides, run_job, tiny_inputs

needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None,
                                     reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]' (DS_BUILD_OPS=0)")


@dataclass(frozen=True)
class Run:
    initial: Path   # the model before training
    zero: Path      # engine.save_checkpoint + config.json and tokenizer
    gathered: Path  # the trained weights gathered from the live ranks, saved with save_pretrained


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """``runs(stage)``: ZeRO-3 trains the plain tiny model; ZeRO-2 one whose unembedding is tied to its embedding."""
    done: dict[int, Run] = {}

    def run(stage: int) -> Run:
        if stage not in done:
            root = tmp_path_factory.mktemp(f"zero{stage}")
            initial = Path(inputs["model.path"]) if stage == 3 else tied_copy(Path(inputs["model.path"]), root / "tied")
            trained = Run(initial, root / "zero", root / "gathered")
            result = subprocess.run([sys.executable, "-m", "tests.zero_training", str(initial), str(trained.zero),
                                     str(trained.gathered), "--stage", str(stage)],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stderr[-3000:]
            done[stage] = trained
        return done[stage]

    return run


def tied_copy(source: Path, target: Path) -> Path:
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def broken_copy(run: Run, target: Path) -> Path:
    shutil.copytree(run.zero, target)
    return target


@needs_deepspeed
# ZeRO-2 with tied weights trains a second model (about 25 s): slow, to keep the suite under 15 minutes.
@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_the_consolidated_checkpoint_is_the_trained_model(runs, stage):
    run = runs(stage)
    assert not list(run.zero.glob("*.safetensors")) and (run.zero / "latest").read_text().strip() == "global_step2"
    consolidated, tokenizer = load_model(run.zero)
    gathered, _ = load_model(run.gathered)
    initial, _ = load_model(run.initial)
    state, reference = consolidated.state_dict(), gathered.state_dict()
    assert list(state) == list(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
        assert tensor.dtype == torch.float32 and not tensor.is_meta
    assert model_fingerprint(consolidated) == model_fingerprint(gathered) != model_fingerprint(initial)
    tied = consolidated.get_output_embeddings().weight is consolidated.get_input_embeddings().weight
    assert tied == (stage == 2)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(run.gathered).get_vocab()
    # bfloat16 rounds the fp32 master weights as from_pretrained rounds the saved ones.
    assert model_fingerprint(load_model(run.zero, dtype=torch.bfloat16)[0]) == \
        model_fingerprint(load_model(run.gathered, dtype=torch.bfloat16)[0])


def composed(name: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(extra))


def table(output_dir: Path) -> list[dict]:
    rows = pq.read_table(next((output_dir / "scores").glob("*.parquet"))).to_pylist()
    return sorted(rows, key=lambda row: (row["query_id"], row["direction"], row["rank"]))


@needs_deepspeed
def test_scoring_the_zero_folder_gives_the_table_of_the_same_weights_saved_for_transformers(runs, inputs, tmp_path):
    run = runs(3)
    fit_factors.main.__wrapped__(composed("fit_factors", *overrides({**inputs, "model.path": str(run.gathered)},
                                                                     f"output_dir={tmp_path / 'fit'}", "progress=false",
                                                                     job="fit_factors")))
    tables = {}
    for name, model in (("zero", run.zero), ("gathered", run.gathered)):
        # The store records the fitted model's fingerprint and scoring refuses another model's.
        settings = overrides({**inputs, "model.path": str(model)}, f"output_dir={tmp_path / name}",
                             f"factors.path={tmp_path / 'fit' / 'factors'}", "score.progress=false")
        score.main.__wrapped__(composed("score", *settings))
        tables[name] = table(tmp_path / name)
    assert len(tables["zero"]) == 2 * 10
    assert [{k: v for k, v in row.items() if k != "run_id"} for row in tables["zero"]] == \
        [{k: v for k, v in row.items() if k != "run_id"} for row in tables["gathered"]]


# A DeepSpeed save in a subprocess: slow suite.
@pytest.mark.slow
@needs_deepspeed
def test_a_partial_checkpoint_is_one_line_and_exit_2(runs, inputs, tmp_path):
    partial = broken_copy(runs(2), tmp_path / "partial")
    (partial / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result, _ = run_job("fit_factors", *overrides({**inputs, "model.path": str(partial)}, f"output_dir={tmp_path / 'out'}",
                                                  job="fit_factors"))
    assert result.returncode == 2, result.stderr[-3000:]
    step = partial / "global_step2"
    assert result.stderr.splitlines() == [
        (f"ERROR: model directory {partial}: cannot consolidate the DeepSpeed checkpoint {step}: Expected 2 of "
         f"'*_optim_states.pt' under '{step}' but found 1 files. Possibly due to an overwrite of an old checkpoint, or a "
         "checkpoint didn't get saved by one or more processes.")]


@needs_deepspeed
def test_a_checkpoint_without_latest_or_its_folder_or_config_names_what_is_missing(runs, tmp_path):
    folder = broken_copy(runs(2), tmp_path / "no-latest")
    (folder / "latest").unlink()
    with pytest.raises(ModelError, match=rf"^model directory {folder}: DeepSpeed checkpoint without a 'latest' file .*"
                                         rf"folders there: global_step2\); if one of them is complete, write its name into "
                                         rf"{folder / 'latest'}$"):
        load_model(folder)
    (folder / "latest").write_text("global_step9")
    with pytest.raises(ModelError, match=rf"{folder / 'latest'} names checkpoint 'global_step9', but there is no folder "
                                         rf"{folder / 'global_step9'} \(folders there: global_step2\)$"):
        load_model(folder)
    (folder / "latest").write_text("global_step2")
    for file in (folder / "global_step2").glob("*_optim_states.pt"):
        file.unlink()
    with pytest.raises(ModelError, match=r"global_step2 has no \*_optim_states.pt file: it is not a complete ZeRO checkpoint$"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match=rf"^model directory {folder} is a DeepSpeed ZeRO checkpoint without config.json: "
                                         r"save the model's config and tokenizer into it"):
        load_model(folder)


@needs_deepspeed
def test_a_checkpoint_of_another_model_size_is_refused_before_any_weight_is_assembled(runs, tmp_path):
    folder = broken_copy(runs(3), tmp_path / "wider")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    with pytest.raises(ModelError, match=rf"^DeepSpeed checkpoint {folder / 'global_step2'} holds "
                                         r"gpt_neox.layers.0.mlp.dense_h_to_4h.weight of shape \(16, 8\), but config.json makes "
                                         r"it \(32, 8\): the checkpoint is of another model size$"):
        load_model(folder)


@needs_deepspeed
def test_a_parameter_the_checkpoint_lacks_is_named(runs, monkeypatch):
    import attribution.zero_checkpoint as zero

    consolidate = zero._consolidation_api(runs(3).zero)

    def without_one(*args, **kwargs):
        lazy = consolidate(*args, **kwargs)
        del lazy["gpt_neox.final_layer_norm.bias"]
        return lazy

    monkeypatch.setattr(zero, "_consolidation_api", lambda directory: without_one)
    with pytest.raises(ModelError, match=rf"^DeepSpeed checkpoint {runs(3).zero / 'global_step2'} has no "
                                         r"gpt_neox.final_layer_norm.bias, which the model of config.json needs$"):
        load_model(runs(3).zero)


@needs_deepspeed
def test_a_rank_file_with_foreign_pickled_objects_loads_only_when_trusted(runs, tmp_path):
    folder = broken_copy(runs(3), tmp_path / "foreign")
    file = folder / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    state = torch.load(file, weights_only=False)
    torch.save({**state, "extra": argparse.Namespace(note="any class a pickle can name")}, file)
    with pytest.raises(ModelError, match=rf"^DeepSpeed checkpoint file {file} holds pickled Python objects "
                                         r"\(argparse.Namespace\) that torch's weights_only loader refuses; .* only for a "
                                         r"checkpoint you trust, set model.trust_remote_code=true$"):
        load_model(folder)
    trusted, _ = load_model(folder, trust_remote_code=True)
    assert model_fingerprint(trusted) == model_fingerprint(load_model(runs(3).gathered)[0])


def test_a_zero_folder_without_deepspeed_installed_says_how_to_install_it(tmp_path, monkeypatch):
    from tests.tiny import save_tiny_lm

    folder = save_tiny_lm(tmp_path / "lm", ["the cat sat"])
    (folder / "model.safetensors").unlink()
    (folder / "global_step1").mkdir()
    (folder / "latest").write_text("global_step1")
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # what an absent package raises: ImportError
    with pytest.raises(ModelError, match=rf"^model directory {folder} is a DeepSpeed ZeRO checkpoint; reading it needs "
                                         r"DeepSpeed: pip install 'attribution\[deepspeed\]'"):
        load_model(folder)
