"""The HTML report's content, checked against the score run's own tables (no browser)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from attribution.report import ReportError, ReportSettings, find_score_run, render_report
from attribution.report.figures import layer_blocks, layouts, rank_ticks
from tests.report.helpers import QUERIES, make_score_run

PAYLOAD = re.compile(r'<script type="application/json" id="q(\d+)">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    record_path, inputs = make_score_run(root)
    report = render_report(record_path, ReportSettings(documents=4))
    record = json.loads(record_path.read_text())
    return {"record_path": record_path, "record": record, "report": report, "html": report.path.read_text(), **inputs}


def payloads(html: str) -> dict[str, dict]:
    found = {}
    for _, block in PAYLOAD.findall(html):
        payload = json.loads(block)
        found[payload["id"]] = payload
    return found


def test_every_query_lists_its_kept_rows_in_rank_order(run):
    table = pq.read_table(run["record"]["outputs"]["scores"]).to_pylist()
    shown = payloads(run["html"])
    assert sorted(shown) == sorted(q["id"] for q in QUERIES)
    for query_id, payload in shown.items():
        for direction, key in (("positive", "top"), ("negative", "bottom")):
            rows = sorted((r for r in table if r["query_id"] == query_id and r["direction"] == direction), key=lambda r: r["rank"])
            assert [(d["rank"], d["doc"], d["score"]) for d in payload[key]] == [(r["rank"], r["doc_id"], r["score"]) for r in rows[:4]]
        assert payload["kept"] == {"top": 6, "bottom": 3}


def test_token_colours_are_the_token_table_laid_on_the_document_text(run):
    tokens = {(r["query_id"], r["doc_id"]): r for r in pq.read_table(run["record"]["outputs"]["token_scores"]).to_pylist()}
    texts = {r["id"]: r["text"] for r in run["rows"]}
    for query_id, payload in payloads(run["html"]).items():
        for document in payload["top"]:
            stored = tokens[(query_id, document["doc"])]
            assert document["aligned"]
            # The table's score at t is the step that predicts token t + 1: it colours token t + 1.
            # The last position predicts nothing in the document, so the shift drops only a zero.
            assert stored["token_scores"][-1] == 0.0
            assert document["s"][0] is None
            np.testing.assert_allclose(document["s"][1:], stored["token_scores"][:-1], rtol=1e-3)
            # Token scores sum to the score (SPEC), so the colours show where the score comes from.
            assert sum(stored["token_scores"]) == pytest.approx(document["score"], rel=1e-3, abs=1e-6)
            words = [t for i, t in enumerate(document["t"]) if i not in document["special"]]
            assert "".join(words).strip() == texts[document["doc"]].strip()


def test_the_demo_sources_are_coloured_most_on_the_answer_word(demo_report):
    """On the demo's own text, the true sources of 'Brethsar Drailthu works as a' -> ' geologist'
    owe most of their score to predicting ' geologist', not to the 'a' before it."""
    (payload,) = payloads(demo_report.path.read_text()).values()
    sources = [document for document in payload["top"] if document["source"]]
    assert len(sources) == 2
    for document in sources:
        strongest = max((i for i, score in enumerate(document["s"]) if score is not None), key=lambda i: abs(document["s"][i]))
        assert document["t"][strongest] == " geologist", document["doc"]


def test_rank_axis_ticks_are_round_positions():
    assert rank_ticks(803) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert rank_ticks(16) == [1, 2, 5, 10, 20]
    assert rank_ticks(1) == [1]
    assert rank_ticks(25_000) == [1, 10, 100, 1000, 10_000, 100_000]
    assert layouts(4, 803)["distribution"]["xaxis"]["tickvals"] == rank_ticks(803)


def test_layer_view_is_the_layer_scores_and_their_shares(run):
    table = pq.read_table(run["record"]["outputs"]["scores"]).to_pylist()
    modules = run["record"]["config"]["modules"]
    for query_id, payload in payloads(run["html"]).items():
        rows = sorted((r for r in table if r["query_id"] == query_id and r["direction"] == "positive"), key=lambda r: r["rank"])[:4]
        layers = np.array([r["layer_scores"] for r in rows], dtype=np.float64)
        np.testing.assert_allclose(np.array(payload["layers"]["z"]), layers.T, rtol=1e-3)
        assert payload["layers"]["x"] == [f"{r['rank']}. {r['doc_id']}" for r in rows]
        blocks = layer_blocks(modules)
        assert blocks == [f"layer {int(name.split('.')[2])}" for name in modules]
        expected = [layers[:, [i for i, b in enumerate(blocks) if b == block]].sum() / sum(r["score"] for r in rows)
                    for block in dict.fromkeys(blocks)]
        np.testing.assert_allclose(payload["share"]["y"], expected, rtol=1e-3, atol=1e-5)


def test_distribution_places_kept_rows_at_their_positions_among_the_documents_scored(run):
    scored = run["record"]["counts"]["documents_scored"]
    for payload in payloads(run["html"]).values():
        shown, others, bottom = payload["distribution"]
        assert shown["x"] == [1, 2, 3, 4] and others["x"] == [5, 6]
        assert bottom["x"] == [scored, scored - 1, scored - 2]
        assert shown["y"] == pytest.approx([d["score"] for d in payload["top"]], rel=1e-3)
        assert payload["scored"] == scored


def test_true_sources_and_the_runs_mrr_and_recall(run):
    table = pq.read_table(run["record"]["outputs"]["scores"]).to_pylist()
    reciprocal, recall = [], []
    for query in (q for q in QUERIES if "source_ids" in q):
        ranked = sorted((r for r in table if r["query_id"] == query["id"] and r["direction"] == "positive"), key=lambda r: r["rank"])
        ranks = [r["rank"] for r in ranked if r["doc_id"] in query["source_ids"]]
        reciprocal.append(1 / ranks[0] if ranks else 0.0)
        recall.append(len([r for r in ranks if r <= 10]) / len(query["source_ids"]))
        payload = payloads(run["html"])[query["id"]]
        assert payload["first_source"] == (ranks[0] if ranks else None)
        assert {d["doc"] for d in payload["top"] if d["source"]} == {r["doc_id"] for r in ranked[:4]} & set(query["source_ids"])
    metrics = re.search(r"MRR ([0-9.]+)</strong> ·\s*<strong>Recall@10 ([0-9.]+)", run["html"])
    assert float(metrics.group(1)) == pytest.approx(np.mean(reciprocal), abs=5e-4)
    assert float(metrics.group(2)) == pytest.approx(np.mean(recall), abs=5e-4)
    assert "over the 2 queries with known sources" in run["html"]


def test_the_page_is_self_contained(run):
    html = run["html"]
    assert not re.search(r"<(link|img|iframe)\b", html)
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert "EK-FAC influence [ekfac]" in html
    assert run["report"].path == run["output"] / "reports" / f"{run['record']['run_id']}.html"


def test_normalised_scores_are_named_in_the_run_summary(run, tmp_path):
    assert "gradient norm" not in run["html"]
    record_path, _ = make_score_run(tmp_path, normalize=True)
    html = render_report(record_path, ReportSettings(documents=4)).path.read_text()
    assert "EK-FAC influence, each divided by the document&#39;s gradient norm [ekfac]" in html


def test_a_score_table_written_as_a_dataset_directory_reads_the_same(run, tmp_path):
    record = dict(run["record"])
    table = pq.read_table(record["outputs"]["scores"])
    directory = tmp_path / "scores"
    directory.mkdir()
    pq.write_table(table.slice(0, 10), directory / "part-0.parquet")
    pq.write_table(table.slice(10), directory / "part-1.parquet")
    record["outputs"] = {**record["outputs"], "scores": str(directory)}
    (tmp_path / "runs").mkdir()
    record_path = tmp_path / "runs" / f"{record['run_id']}.json"
    record_path.write_text(json.dumps(record))
    again = render_report(record_path, ReportSettings(documents=4, path=str(tmp_path / "r.html")))
    assert payloads(again.path.read_text()) == payloads(run["html"])


def test_the_latest_score_run_is_found_and_a_missing_one_is_named(run, tmp_path):
    assert find_score_run(run["output"]) == run["record_path"]
    with pytest.raises(ReportError, match=r"no finished score run in .*; score one with `python -m jobs.score"):
        find_score_run(tmp_path)
    with pytest.raises(ReportError, match="report.run_id=nope: no run record"):
        find_score_run(run["output"], "nope")
    with pytest.raises(ReportError, match=r"report.documents=0: expected a whole number >= 1"):
        ReportSettings(documents=0)
