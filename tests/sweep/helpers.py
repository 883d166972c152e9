"""Running a sweep and the one-shot reference it must equal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from attribution.scoring.run import run_score
from attribution.settings import PrefilterSettings
from attribution.sweep import SweepSettings, SweepSummary, run_sweep
from tests.sweep.conftest import World


def sweep(world: World, date: str, *, prefilter: PrefilterSettings = PrefilterSettings(), **settings: Any) -> SweepSummary:
    """One night over ``world`` (in this process); ``settings`` are SweepSettings fields."""
    return run_sweep(world.model, world.data, world.factors, world.queries, world.score, world.output, {},
                     SweepSettings(date=date, **settings), prefilter=prefilter)


def reference(world: World, name: str = "reference") -> tuple[list[dict], list[dict]]:
    """One run_score over every shard now in the corpus: score rows and token rows."""
    summary = run_score(world.model, world.data, world.factors, world.queries, world.score, world.root / name, {})
    tokens = pq.read_table(summary.token_scores_path).to_pylist() if summary.token_scores_path else []
    return pq.read_table(summary.scores_path).to_pylist(), tokens


def current(world: World) -> tuple[list[dict], list[dict]]:
    tokens = world.output / "current" / "token_scores.parquet"
    return (pq.read_table(world.output / "current" / "scores.parquet").to_pylist(),
            pq.read_table(tokens).to_pylist() if tokens.exists() else [])


def ranking(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """(query, direction) -> [(rank, doc_id, shard as an absolute path)] in rank order."""
    result: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for row in sorted(rows, key=lambda r: (r["query_id"], r["direction"], r["rank"])):
        result.setdefault((row["query_id"], row["direction"]), []).append(
            (row["rank"], row["doc_id"], os.path.abspath(row["shard"])))
    return result


def assert_same_table(rows: list[dict], expected: list[dict], tokens: list[dict] = (), expected_tokens: list[dict] = ()) -> None:
    """Same rankings (ranks, documents, shards) and the same scores, layer scores and token scores."""
    assert ranking(rows) == ranking(expected)
    assert len(rows) == len(expected)
    by_key = {(r["query_id"], r["direction"], r["doc_id"]): r for r in expected}
    for row in rows:
        other = by_key[(row["query_id"], row["direction"], row["doc_id"])]
        assert row["score"] == pytest.approx(other["score"], rel=1e-6, abs=1e-9)
        assert row["layer_scores"] == pytest.approx(other["layer_scores"], rel=1e-5, abs=1e-7)
    token_map = {(t["query_id"], t["doc_id"]): t for t in expected_tokens}
    assert {(t["query_id"], t["doc_id"]) for t in tokens} == set(token_map)
    for row in tokens:
        other = token_map[(row["query_id"], row["doc_id"])]
        assert row["tokens"] == other["tokens"]
        assert row["token_scores"] == pytest.approx(other["token_scores"], rel=1e-5, abs=1e-7)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
