"""The score workflow end to end on a saved tiny model: tables, invariances, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.curvature.store import FactorStoreError
from attribution.fitting import run_fit
from attribution.scoring.run import run_score
from attribution.scoring.tables import SCORE_SCHEMA
from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings
from tests.tiny import save_tiny_lm

WORDS = "the cat sat on a mat while dogs ran in parks near rivers and birds sang over hills".split()


def corpus_rows(count: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": f"doc-{i:02d}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))} for i in range(count)]


def write_shards(directory, shards: list[list[dict]]) -> str:
    directory.mkdir(parents=True)
    for index, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows), directory / f"shard-{index}.parquet")
    return str(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rows = corpus_rows()
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:6], rows[6:] + [{"id": "empty", "text": "  "}]])
    queries = root / "queries.jsonl"
    query_rows = [
        {"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat"},
        {"id": "q-dog", "prompt": "dogs ran in", "completion": " parks"},
        {"id": "q-bird", "prompt": "birds sang over", "completion": " hills and rivers"},
        {"id": "q-empty", "prompt": "the cat", "completion": ""},
        {"id": "q-long", "prompt": " ".join(["the"] * 40), "completion": " cat"},
    ]
    queries.write_text("".join(json.dumps(r) + "\n" for r in query_rows))
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=corpus, max_length=16, batch_size=4)
    fit = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    return root, rows, model, data, FactorSettings(path=str(fit.factors_path)), QuerySettings(path=str(queries))


def score(setup, output, data=None, **score_overrides):
    root, _, model, default_data, factors, queries = setup
    settings = ScoreSettings(**{"rank": 4, "top_k": 5, "bottom_k": 2, "query_batch_size": 2, "progress": False, **score_overrides})
    summary = run_score(model, data or default_data, factors, queries, settings, root / output, {})
    return summary, pq.read_table(summary.scores_path)


def comparable(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table.column(c).to_pylist() for c in ("query_id", "direction", "rank", "doc_id"))))


def test_tables_and_run_record(setup):
    summary, table = score(setup, "basic")
    assert table.schema.equals(SCORE_SCHEMA)
    positive = table.filter(pa.compute.equal(table["direction"], "positive"))
    assert positive.num_rows == 3 * 5 and table.num_rows == 3 * 7
    assert set(table["method"].to_pylist()) == {"ekfac"}
    for row in table.to_pylist():
        assert row["score"] == pytest.approx(sum(row["layer_scores"]), rel=1e-5, abs=1e-9)
        assert len(row["layer_scores"]) == 8
    tokens = pq.read_table(summary.token_scores_path).to_pylist()
    assert len(tokens) == positive.num_rows
    by_pair = {(r["query_id"], r["doc_id"]): r["score"] for r in positive.to_pylist()}
    for row in tokens:
        assert len(row["tokens"]) == len(row["token_scores"])
        assert sum(row["token_scores"]) == pytest.approx(by_pair[(row["query_id"], row["doc_id"])], rel=1e-4, abs=1e-7)
    record = json.loads(summary.run_record.read_text())
    reasons = {s["item_id"]: s["reason"] for s in record["skips"]}
    assert reasons["empty"] == "whitespace-only text"
    assert "no completion token" in reasons["q-empty"] or "empty" in reasons["q-empty"]
    assert "over max_length 16" in reasons["q-long"]
    assert record["counts"]["documents_scored"] == 12 and record["counts"]["queries_scored"] == 3
    assert record["fingerprints"]["model"]


def test_same_table_whatever_the_batching_or_shard_layout(setup, tmp_path):
    _, reference = score(setup, "reference", rank=None)
    rows = corpus_rows()
    relaid = write_shards(tmp_path / "relaid", [list(reversed(rows[6:])), rows[3:6], list(reversed(rows[:3]))])
    _, _, _, data, _, _ = setup
    variants = [
        score(setup, "batch1", rank=None, query_batch_size=1, data=DataSettings(path=data.path, max_length=16, batch_size=1))[1],
        score(setup, "relaid", rank=None, query_batch_size=3, data=DataSettings(path=relaid, max_length=16, batch_size=5))[1],
    ]
    reference_scores = dict(zip(comparable(reference), sorted(reference["score"].to_pylist())))
    for table in variants:
        assert comparable(table) == comparable(reference)
        expected = {(r["query_id"], r["direction"], r["doc_id"]): r["score"] for r in reference.to_pylist()}
        for r in table.to_pylist():
            assert r["score"] == pytest.approx(expected[(r["query_id"], r["direction"], r["doc_id"])], rel=1e-4)
    assert reference_scores


def test_a_normalized_run_is_another_run_and_says_so(setup):
    """``score.normalize`` changes every score, so it is in the run key, and the score line says what the table holds."""
    plain, plain_table = score(setup, "plain")
    normalized, normalized_table = score(setup, "plain", normalize=True)
    assert not normalized.reused and normalized.run_id != plain.run_id
    assert "note: score.normalize: every score (its layer and token parts too) is divided" in normalized.line()
    assert "score.normalize" not in plain.line()
    assert plain_table["score"].to_pylist() != normalized_table["score"].to_pylist()


def test_factors_missing_a_tracked_module(setup, tmp_path):
    root, _, model, data, _, queries = setup
    mlp_only = run_fit(ModelSettings(path=model.path, tracked_modules="mlp", device="cpu"), data,
                       FactorSettings(path=str(tmp_path / "mlp")), tmp_path, {}, progress=False)
    with pytest.raises(FactorStoreError, match="no factors for tracked module gpt_neox.layers.0.attention.query_key_value"):
        run_score(model, data, FactorSettings(path=str(mlp_only.factors_path)), queries, ScoreSettings(progress=False), tmp_path, {})


def test_non_finite_document_is_a_recorded_skip(setup, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, rows, model, data, _, queries = setup
    poisoned_dir = tmp_path / "poisoned"
    lm = AutoModelForCausalLM.from_pretrained(model.path)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    word = tokenizer.convert_tokens_to_ids("near")
    with torch.no_grad():
        lm.get_input_embeddings().weight[word] = float("inf")
    lm.save_pretrained(poisoned_dir)
    tokenizer.save_pretrained(poisoned_dir)
    summary = run_score(ModelSettings(path=str(poisoned_dir), device="cpu"), data, FactorSettings(strategy="identity"),
                        queries, ScoreSettings(rank=4, token_scores=False, progress=False), tmp_path, {})
    record = json.loads(summary.run_record.read_text())
    skipped = {s["item_id"] for s in record["skips"] if "non-finite" in s["reason"]}
    with_word = {r["id"] for r in rows if "near" in r["text"].split()}
    assert with_word and skipped == with_word
    table = pq.read_table(summary.scores_path)
    assert not (set(table["doc_id"].to_pylist()) & with_word)
    assert np.isfinite(table["score"].to_numpy()).all()
    assert table["method"].to_pylist()[0] == "identity"
