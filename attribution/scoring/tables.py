"""The score table and the token side table (SPEC "Score table"), written atomically as Parquet parts."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.scoring.topk import Ranked

SCORE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("query_id", pa.string()),
        ("direction", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("layer_scores", pa.list_(pa.float32())),
        ("shard", pa.string()),
        ("method", pa.string()),
    ]
)

TOKEN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("token_scores", pa.list_(pa.float32())),
    ]
)


def score_table(rows: Sequence[Ranked], run_id: str, direction: str, method: str) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "run_id": [run_id] * len(rows),
            "query_id": [r.query_id for r in rows],
            "direction": [direction] * len(rows),
            "rank": [r.rank for r in rows],
            "doc_id": [r.doc_id for r in rows],
            "score": [r.score for r in rows],
            "layer_scores": [np.asarray(r.layer_scores, dtype=np.float32) for r in rows],
            "shard": [r.shard for r in rows],
            "method": [method] * len(rows),
        },
        schema=SCORE_SCHEMA,
    )


def read_ranked(path: str | Path, direction: str = "positive") -> dict[str, list[Ranked]]:
    """The rows of one direction of a score table, per query, in rank order."""
    table = pq.read_table(path, filters=[("direction", "=", direction)])
    ranked: dict[str, list[Ranked]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["query_id"], r["rank"])):
        ranked.setdefault(row["query_id"], []).append(
            Ranked(row["query_id"], row["rank"], row["doc_id"], row["shard"], row["score"],
                   np.asarray(row["layer_scores"], dtype=np.float32))
        )
    return ranked


def write_part(table: pa.Table, directory: str | Path, name: str) -> Path:
    """Write ``directory/name.parquet`` through a hidden temporary file and a rename.

    Readers of the dataset directory skip hidden files, so they never see a partial part.
    """
    target_dir = Path(directory)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}.parquet"
    staging = target_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, staging)
    os.replace(staging, target)
    return target
