"""``refine.workers``: the refinement sample's Gauss-Newton products split over Ray workers equal the
products of one process, survive a killed worker, and give a score run the same refined scores."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import ray
import torch

from attribution.curvature.gauss_newton import GaussNewton
from attribution.data.corpus import list_shards
from attribution.data.stream import training_batches
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine.product_pool import ProductSource, RemoteGaussNewton, start_product_workers, stop_product_workers
from attribution.scoring.run import run_score
from attribution.settings import (
    ClusterSettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from tests.refine.test_score_run import fitted_tiny

SAMPLE = 7  # sequences, in batches of 2: an odd count, so the workers' parts differ in size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    queries = [{"id": f"q{i}", "prompt": prompt, "completion": completion} for i, (prompt, completion) in
               enumerate([("the cat sat on", " a mat"), ("dogs ran in", " parks"), ("birds sang over", " hills")])]
    return fitted_tiny(tmp_path_factory.mktemp("refine-workers"), queries, batch_size=2)


def test_split_products_equal_one_process_and_survive_a_killed_worker(setup, ray_local):
    root, model_settings, data, factors, queries = setup
    model, tokenizer = load_model(model_settings.path, False, torch.float64, "cpu")
    tracked = find_tracked_modules(model)
    sample = list(training_batches(tokenizer, list_shards(data.path), data, lambda skip: None, SAMPLE))
    local = GaussNewton(model, tracked, sample)
    source = ProductSource(model_settings.path, model_settings, model_fingerprint(model), tuple(m.name for m in tracked),
                           data.path, data.max_length, data.batch_size, SAMPLE, 2, "refine.data_path")
    pool = start_product_workers(ClusterSettings(num_workers=0, max_retries=1), 2, ["model"])
    try:
        remote = RemoteGaussNewton(pool["model"], source, len(sample), SAMPLE, local.size, torch.device("cpu"))
        vectors = torch.randn(3, local.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        expected = local(vectors)
        torch.testing.assert_close(remote(vectors), expected, rtol=1e-10, atol=1e-12)
        # Ray restarts the worker and retries its product, which reads its part of the sample again.
        ray.kill(pool["model"][1], no_restart=False)
        torch.testing.assert_close(remote(vectors), expected, rtol=1e-10, atol=1e-12)
        wrong = RemoteGaussNewton(pool["model"], source, len(sample), SAMPLE + 1, local.size, torch.device("cpu"))
        with pytest.raises(SettingsError, match=r"refine.data_path=.*changed during the run: the refinement workers read 7"):
            wrong(vectors)
    finally:
        stop_product_workers(pool)


def scores(summary) -> dict[tuple[str, str], float]:
    return {(r["query_id"], r["doc_id"]): r["score"] for r in pq.read_table(summary.scores_path).to_pylist()}


# The split products are checked against one process above; the whole score run on workers: slow suite.
@pytest.mark.slow
def test_a_run_refined_on_workers_scores_as_one_refined_in_process(setup, ray_local, tmp_path):
    """The products leave the process, the solver does not: the same converged scores (to the
    tolerance the refined scores meet against the dense solve, tests/refine/test_score_run.py)."""
    root, model, data, factors, queries = setup
    score = ScoreSettings(rank=None, top_k=10, token_scores=False, progress=False, dtype="float64")
    refine = RefineSettings(method="cg", steps=200, tolerance=1e-10, max_sequences=SAMPLE, batch_size=2, cached_sequences=2)
    in_process = run_score(model, data, factors, queries, score, tmp_path / "local", {}, refine_settings=refine)
    on_workers = run_score(model, data, factors, queries, score, tmp_path / "workers", {}, cluster=ClusterSettings(num_workers=0),
                           refine_settings=replace(refine, workers=2))
    expected = scores(in_process)
    assert len(expected) == 3 * 10
    for key, value in scores(on_workers).items():
        assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-9)
    record = json.loads(on_workers.run_record.read_text())["config"]
    assert record["resolved_settings"]["refine"]["workers"] == 2
    assert all(d["gauss_newton_products"] > 1 and d["status"] == "converged" for [d] in record["query_diagnostics"].values())


def test_a_cluster_without_room_for_the_product_workers_is_one_line(ray_local):
    """Two score workers and two product workers on the two CPUs of the test's Ray: refused, not left waiting."""
    with pytest.raises(SettingsError, match=r"^refine.workers=2: the Ray cluster has 2 CPUs, the run needs 4 "
                                             r"\(cluster.num_workers=2 and refine.workers=2 for each of 1 refined stage"):
        start_product_workers(ClusterSettings(num_workers=2), 2, ["model"])
