"""The gradient prefilter as a user runs it: the pipeline fits the store, sketches the corpus with
it, scores each query's sketch candidates; a rerun with the same store extends nothing."""

from __future__ import annotations

import json

from tests.jobs.helpers import overrides, run_job, tiny_inputs


def test_the_pipeline_with_gradient_sketches(tmp_path):
    inputs = tiny_inputs(tmp_path / "inputs")
    arguments = overrides(inputs, f"output_dir={tmp_path / 'run'}", "prefilter.kind=gradient", "prefilter.top_m=4",
                          "score.top_k=3", job="pipeline")
    first, _ = run_job("pipeline", *arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "each on its gradient top-4 candidates (" in first.stdout
    manifest = json.loads((tmp_path / "run" / "prefilter" / "gradient" / "manifest.json").read_text())
    encoder = manifest["encoder"]
    assert encoder["sketch_dim"] == 64 and encoder["sketch_components"] == 1536 and encoder["sketch_bits"] == 4
    assert encoder["sketch_basis_documents"] == 8192 and len(encoder["codebook_sha256"]) == 64
    assert manifest["kind"] == "gradient" and manifest["encoder"]["whitened_by"]
    again, _ = run_job("build_index", *overrides(inputs, f"output_dir={tmp_path / 'run'}", "prefilter.kind=gradient",
                                                  job="build_index"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "added 0 shard(s)" in again.stdout
