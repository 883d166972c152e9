"""The evaluate config: the shipped conf/evaluate.yaml parses, and every mistake is named."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from attribution.evaluation.config import DampingSpec, EvaluationSettings, GroundTruthSpec
from attribution.evaluation.table import MetricsRow, format_rows, metrics_table
from attribution.settings import SettingsError

CONF = Path(__file__).resolve().parents[2] / "conf" / "evaluate.yaml"


def shipped() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF).evaluate, resolve=True)


def test_shipped_config_parses():
    settings = EvaluationSettings.from_config(shipped())
    kinds = {method.name: method.kind for method in settings.methods}
    assert kinds["ekfac"] == "ekfac" and kinds["lissa"] == "lissa" and kinds["identity"] == "identity"
    assert ("ekfac_rank32", "ekfac") in settings.compare
    assert settings.damping.values[0] > 0 and settings.ground_truth.kind == "cg"


def test_defaults_mirror_the_shipped_config():
    """Code that builds settings without the conf (tests, notebooks) gets what the job runs."""
    settings = EvaluationSettings.from_config(shipped())
    assert settings.ground_truth == GroundTruthSpec() and settings.damping == DampingSpec()
    without_methods = dataclasses.replace(settings, methods=(), compare=())
    assert without_methods == EvaluationSettings()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["methods"].update(bad={"kind": "newton"}), "kind='newton'"),
        (lambda c: c.update(compare=[["ekfac", "nothing"]]), "must name two of the methods"),
        (lambda c: c["methods"].update(lissa={"kind": "lissa", "equal_time_to": "nothing"}), "not a non-LiSSA method"),
        (lambda c: c["methods"].update(other={"kind": "lissa", "equal_time_to": "lissa"}), "not a non-LiSSA method"),
        (lambda c: c["damping"].update(values=[1.0, 0.0]), "must be positive"),
        (lambda c: c["ground_truth"].update(kind="exact"), "ground_truth.kind='exact'"),
        (lambda c: c["ground_truth"].update(preconditioner="kfac"), "ground_truth.preconditioner='kfac'"),
        (lambda c: c.update(typo=1), "unknown key(s) in evaluate: typo"),
        (lambda c: c["methods"]["ekfac"].update(rnak=3), "unknown key(s) in evaluate.methods.ekfac: rnak"),
    ],
)
def test_mistakes_are_named(change, message):
    config = shipped()
    change(config)
    with pytest.raises(SettingsError) as error:
        EvaluationSettings.from_config(config)
    assert message in str(error.value)


def test_table_prints_missing_values_as_dashes_and_keeps_the_schema():
    rows = [MetricsRow("ekfac", 0.5, 1.0, 0.61234, 0.7, 12.0, 3.2e-4, 0.9, 0.8, 10, "detail"),
            MetricsRow("identity", 0.5, 1.0, float("nan"), 0.1, 0.0, 1e-4, 0.5, 0.25, 10, "")]
    text = format_rows(rows).splitlines()
    assert text[0].split()[:8] == ["method", "damping", "Spearman", "Pearson", "overhead", "s", "pair-wise", "s"]
    assert "0.612" in text[2] and "5.00e-01" in text[2]
    assert text[3].split()[2] == "-"
    table = metrics_table(rows, "run-1").to_pylist()
    assert table[0]["run_id"] == "run-1" and table[0]["spearman"] == pytest.approx(0.61234)
    assert math.isnan(table[1]["spearman"])
