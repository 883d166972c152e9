"""``jobs.sketch_benchmark`` runs end to end on a small corpus and keeps its stages for a rerun."""

from __future__ import annotations

import json

import pytest

from tests.jobs.helpers import run_job

SMALL = ("sketch_benchmark.documents=850", "sketch_benchmark.shards=2", "sketch_benchmark.sketch_dims=[4]",
         "sketch_benchmark.fractions=[0.1]", "sketch_benchmark.cost_sketch_dim=4", "sketch_benchmark.cost_fractions=[0.05]",
         "sketch_benchmark.component_sketch_dim=4", "sketch_benchmark.compressed=[[8,16],[8,4]]",
         "sketch_benchmark.cost_components=8", "sketch_benchmark.cost_bits=8",
         "sketch_benchmark.top=10", "sketch_benchmark.dense_max_documents=0")


@pytest.mark.slow
def test_the_sketch_benchmark_reports_recall_and_cost_and_resumes(tmp_path):
    first, _ = run_job("sketch_benchmark", *SMALL, f"output_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "sketch_benchmark.json").read_text())
    assert set(results) == {"demo", "large"} and results["large"]["documents"] == 850
    for result in results.values():
        methods = [row["method"] for row in result["rows"]]
        assert methods == ["gradient k=4", "gradient k=4, C=8", "gradient k=4, C=8, 4-bit", "bm25"]
        assert [row["bytes_per_document_per_layer"] for row in result["rows"][:3]] == [128, 64, 16]
        assert all(0 <= row["recall"]["0.1"] <= 1 for row in result["rows"])
        assert result["costs"][0]["top_m"] == round(0.05 * result["documents"])
        kept = result["kept_sketches"]
        assert kept["kept_seconds"] > 0 and kept["plain_seconds"] > 0 and kept["index_creation_seconds"] > 0
    assert "| gradient k=4 |" in first.stdout and "| gradient k=4, C=8 |" in first.stdout
    assert "64 queries through the index (k=4, C=8, 8-bit," in first.stdout
    assert "The full pass keeping sketches (gradient k=4, C=8, 8-bit): " in first.stdout
    again, _ = run_job("sketch_benchmark", *SMALL, f"output_dir={tmp_path}")
    assert again.returncode == 0 and json.loads((tmp_path / "sketch_benchmark.json").read_text()) == results
