"""Every setting is checked when its group is built: one line naming the key, the value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attribution.scoring.inputs import ScoreInputs
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    MissingPathError,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
    from_mapping,
)

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"model": ModelSettings, "data": DataSettings, "factors": FactorSettings, "finetune": FinetuneSettings,
          "queries": QuerySettings, "score": ScoreSettings, "prefilter": PrefilterSettings, "cluster": ClusterSettings}


@pytest.fixture(scope="module", autouse=True)
def hydra_config():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


def settings_of(config_name: str, overrides: list[str]) -> dict[str, object]:
    """The typed settings a job builds from its Hydra config, as ``jobs.wiring`` does."""
    cfg = compose(config_name=config_name, overrides=overrides)
    return {group: from_mapping(kind, OmegaConf.to_container(cfg[group], resolve=True), group)
            for group, kind in GROUPS.items() if group in cfg}


@pytest.mark.parametrize("config_name", ["score", "fit_factors", "pipeline", "build_index", "sweep"])
def test_every_job_default_is_valid(config_name):
    assert settings_of(config_name, [])


@pytest.mark.parametrize(("override", "message"), [
    # The mistakes that used to run to exit 0 with wrong or empty tables.
    ("score.rank=-1", "score.rank=-1: expected a positive integer or null (full rank)"),
    ("score.rank=-5", "score.rank=-5: expected a positive integer or null (full rank)"),
    ("factors.damping=-1", "factors.damping=-1: expected a positive number or null (0.1 x the mean eigenvalue of each module)"),
    ("score.top_k=0", "score.top_k=0: expected a positive integer (rows per query) or all (every pair)"),
    ("cluster.num_workers=-2", "cluster.num_workers=-2: expected a non-negative integer"),
    ("score.query_batch_size=0", "score.query_batch_size=0: expected a positive integer"),
    # Types: what Hydra parses from a mistyped override.
    ("score.rank=full", "score.rank='full': expected a positive integer or null (full rank)"),
    ("score.rank=true", "score.rank=true: expected a positive integer or null (full rank)"),
    ("score.token_scores=yes", "score.token_scores='yes': expected true or false"),
    ("data.max_length=1", "data.max_length=1: expected an integer >= 2"),
    ("data.batch_size=2.5", "data.batch_size=2.5: expected a positive integer"),
    ("factors.damping=nan", "factors.damping=nan: expected a positive number"),
    ("factors.damping=0", "factors.damping=0: expected a positive number"),
    ("factors.max_sequences=0", "factors.max_sequences=0: expected a positive integer or null (the whole corpus)"),
    ("score.bottom_k=-1", "score.bottom_k=-1: expected a non-negative integer"),
    ("prefilter.top_m=0", "prefilter.top_m=0: expected a positive integer"),
    ("prefilter.b=1.5", "prefilter.b=1.5: expected a number from 0 to 1"),
    ("cluster.max_retries=-1", "cluster.max_retries=-1: expected a non-negative integer"),
    ("cluster.cpus_per_worker=-1", "cluster.cpus_per_worker=-1: expected a number >= 0"),
    # Choices.
    ("data.on_bad_row=ignore", "data.on_bad_row='ignore': expected one of error, skip"),
    ("factors.strategy=ekfca", "factors.strategy='ekfca': expected one of ekfac, kfac, diagonal, identity"),
    ("factors.fisher=false", "factors.fisher=false: expected true (labels sampled from the model) or empirical"),
    ("score.method=best", "score.method='best': expected one of influence, prefilter"),
    ("score.dtype=long", "score.dtype='long': expected a torch floating-point dtype"),
    ("model.dtype=int8", "model.dtype='int8': expected a torch floating-point dtype"),
    ("model.device=gpu", "model.device='gpu': expected auto or a torch device"),
    ("model.tracked_modules='('", "model.tracked_modules='(': expected all, mlp or a valid regular expression"),
    ("prefilter.kind=bm52", "prefilter.kind='bm52': expected one of none, tfidf, bm25, dense"),
    ("prefilter.sketch_bits=5", "prefilter.sketch_bits=5: expected one of 16, 8, 4"),
    ("data.text_field=id", "data.text_field='id': expected a column other than data.id_field='id'"),
    ("cluster.node_ip=0.0.0.0", "cluster.node_ip='0.0.0.0': expected an IP address such as 127.0.0.1 or auto"),
    ("cluster.listen=everywhere", "cluster.listen='everywhere': expected an IP address such as 127.0.0.1 or node"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(SettingsError) as error:
        settings_of("score", [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize(("override", "message"), [
    ("model.path=/nowhere/model", "model.path=/nowhere/model: no such directory"),
    ("data.path=/nowhere/corpus", "data.path=/nowhere/corpus: no such file, folder or glob match"),
    ("data.path=/nowhere/*.jsonl", "data.path=/nowhere/*.jsonl: no such file, folder or glob match"),
    ("queries.path=/nowhere/q.jsonl", "queries.path=/nowhere/q.jsonl: no such file, folder or glob match"),
    ("finetune.model_path=/nowhere/ft", "finetune.model_path=/nowhere/ft: no such directory"),
    ("prefilter.model=/nowhere/encoder", "prefilter.model=/nowhere/encoder: no such directory"),
])
def test_an_input_path_that_does_not_exist_is_named(override, message):
    if override.startswith("finetune"):
        override = [override, "finetune.factors_path=/nowhere/store"]
    with pytest.raises(MissingPathError, match=f"^{message}$".replace("*", r"\*")):
        settings_of("score", override if isinstance(override, list) else [override])


def test_values_are_checked_before_paths_and_the_demo_fills_null_paths(tmp_path):
    with pytest.raises(SettingsError, match="data.batch_size=0") as error:
        DataSettings(path="/nowhere", batch_size=0)
    assert not isinstance(error.value, MissingPathError)
    assert DataSettings(path=str(tmp_path)).path == str(tmp_path)
    assert ModelSettings().path is None and QuerySettings().path is None


def test_the_accepted_forms(tmp_path):
    assert ScoreSettings(top_k="all").all_pairs and ScoreSettings(rank=None).rank is None
    assert FactorSettings(fisher="empirical", damping=1).damping == 1
    assert ClusterSettings(node_ip="auto", listen="node").listen == "node"
    assert ClusterSettings(node_ip="10.0.0.5", listen="::1").node_ip == "10.0.0.5"
    assert ModelSettings(device="cuda:1", dtype="bfloat16", tracked_modules=r"\.mlp\.").device == "cuda:1"
    (tmp_path / "a.jsonl").write_text("")
    assert DataSettings(path=str(tmp_path / "*.jsonl")).path.endswith("*.jsonl")
    with pytest.raises(SettingsError, match="needs both finetune.model_path and finetune.factors_path"):
        FinetuneSettings(model_path=str(tmp_path))


def test_refine_auto_is_cg_where_it_can_run_and_the_closed_form_elsewhere():
    auto = RefineSettings(method="auto", steps=7)
    assert auto.resolved("ekfac", sharded=False) == RefineSettings(method="cg", steps=7)
    assert auto.resolved("kfac", sharded=False).method == "cg"
    assert auto.resolved("identity", sharded=False).method == "none"
    assert auto.resolved("ekfac", sharded=True).method == "none"
    assert RefineSettings(method="stochastic").resolved("identity", sharded=True).method == "stochastic"
    assert not auto.enabled
    # A score run holds what runs, so its key and record do too.
    inputs = ScoreInputs(ModelSettings(), DataSettings(), FactorSettings(), QuerySettings(), ScoreSettings(), refine=auto)
    assert inputs.refine.method == "cg" and inputs.resolved()["refine"]["method"] == "cg"
    sharded = ClusterSettings(num_workers=2, sharding="fsdp")
    assert ScoreInputs(ModelSettings(), DataSettings(), FactorSettings(), QuerySettings(), ScoreSettings(), cluster=sharded,
                       refine=auto).refine.method == "none"
    with pytest.raises(SettingsError, match="refine.method=cg with cluster.sharding=fsdp"):
        ScoreInputs(ModelSettings(), DataSettings(), FactorSettings(), QuerySettings(), ScoreSettings(), cluster=sharded,
                    refine=RefineSettings(method="cg"))
    # The jobs' default is auto.
    assert all(compose(config_name=job).refine.method == "auto" for job in ("score", "pipeline", "sweep"))


def test_a_job_exits_2_with_the_one_line(tmp_path):
    """As a new user meets it: the job's own entry point, before any model is loaded."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [sys.executable, "-m", "jobs.score", "score.rank=-1", f"output_dir={tmp_path}"],
        check=False, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert finished.stderr.strip().splitlines()[-1] == (
        "ERROR: score.rank=-1: expected a positive integer or null (full rank)")
