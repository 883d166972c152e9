"""``methods.NAME.normalize``: each document's scores divided by its gradient norm, the norm checked against
plain autograd of ``log p(z)`` one document at a time, and the setting's bad values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution.counterfactual.methods import Damping, Engine
from attribution.counterfactual.settings import MethodSpec, _method
from attribution.data.batching import batch_documents
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.models import find_tracked_modules, load_model
from attribution.settings import ClusterSettings, DataSettings, ModelSettings, QuerySettings, ScoreSettings, SettingsError
from tests.scoring.test_engine import autograd_gradient
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm


def brute_force_norm(model, tracked, batch) -> float:
    """``||grad log p(z)||`` over the tracked weights and biases, by plain autograd on a batch of one."""
    return float(sum(g.square().sum() for g in autograd_gradient(model, tracked, batch).values()).sqrt())


def test_a_normalized_method_divides_by_each_documents_gradient_norm(tmp_path):
    """``normalize: true`` is the engine's ``score.normalize``: the dot product's scores over the document's gradient
    norm, the norm taken here by autograd one document at a time."""
    rows = corpus_rows(7)
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows] + WORDS)
    data = DataSettings(path=write_shards(tmp_path / "corpus", [rows[:4], rows[4:]]), max_length=16, batch_size=3)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q", "prompt": "the cat sat on", "completion": " a mat"}) + "\n")
    model, tokenizer = load_model(model_dir, False, torch.float64, "cpu")
    tracked = find_tracked_modules(model)
    documents = list(iter_documents(list_shards(data.path), on_skip=lambda skip: None))
    norms = np.array([brute_force_norm(model, tracked, next(batch_documents(tokenizer, [document], 1, data.max_length,
                                                                           lambda skip: None)))
                      for document in documents])
    engine = Engine(ModelSettings(path=str(model_dir), device="cpu", dtype="float64"), data, QuerySettings(str(queries)),
                    ScoreSettings(progress=False, dtype="float64"), ClusterSettings(num_workers=0), 4, tmp_path / "out",
                    [document.id for document in documents], read_queries(queries, lambda skip: None), {}, tracked)
    methods = {spec.name: spec for spec in settings_methods({"dot": {"kind": "identity"},
                                                             "cosine": {"kind": "identity", "normalize": True}})}
    damping = Damping(None, None, float("nan"))
    dot, cosine = engine.method_scores(methods["dot"], damping), engine.method_scores(methods["cosine"], damping)
    np.testing.assert_allclose(cosine.scores, dot.scores / norms[:, None], rtol=1e-9)
    assert "unit-normalised" in cosine.detail and "unit-normalised" not in dot.detail


def settings_methods(methods: dict) -> list[MethodSpec]:
    """``methods.*`` as the job reads them."""
    return [_method(name, spec) for name, spec in methods.items()]


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "identity", "normalize": "yes"}, r"methods.m.normalize='yes': expected true or false"),
    ({"kind": "bm25", "normalize": True}, r"methods.m.normalize=true: bm25 has no gradient to normalise by"),
])
def test_bad_normalize_values_name_the_key(spec, message):
    with pytest.raises(SettingsError, match=message):
        settings_methods({"m": spec})
