"""The merge: every finished unit's kept rows into the run's tables, one pass at a time.

Per pass, the units' rows are folded into the top-k (and bottom-k) per query as Arrow tables
(:class:`~attribution.scoring.tables.RankedMerge`), and written to the score table as one more
row group; the token rows of the kept top rows are copied from the units' token files. The
driver holds one pass's kept rows and one unit's files at a time.

With ``score.top_k=all`` there is nothing to merge: the units' pairs files, already in the
work directory, are moved into ``pairs/run_id=<run_id>/`` in one rename.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attribution.data.corpus import DataError
from attribution.scoring.markers import MarkerStore, WorkUnit
from attribution.scoring.tables import (
    SCORE_SCHEMA,
    TOKEN_SCHEMA,
    RankedMerge,
    StreamedTable,
    pair_keys,
    score_rows,
)
from attribution.settings import ScoreSettings


@dataclass
class PassUnits:
    """A pass's number of kept queries and its units that finished."""

    num_queries: int
    units: list[WorkUnit]


def merge_top_tables(store: MarkerStore, passes: Sequence[PassUnits], run_id: str, method: str, score: ScoreSettings,
                     output_dir: Path) -> tuple[Path, Path | None]:
    """Write ``scores/<run_id>.parquet`` (and ``token_scores/<run_id>.parquet``); their paths."""
    scores_path = output_dir / "scores" / f"{run_id}.parquet"
    tokens_path = output_dir / "token_scores" / f"{run_id}.parquet" if score.token_scores else None
    with ExitStack() as files:
        scores = files.enter_context(StreamedTable(scores_path, SCORE_SCHEMA))
        tokens = files.enter_context(StreamedTable(tokens_path, TOKEN_SCHEMA)) if tokens_path is not None else None
        for group in passes:
            top = RankedMerge(int(score.top_k), True, group.num_queries)
            bottom = RankedMerge(score.bottom_k, False, group.num_queries)
            for unit in group.units:
                rows = store.rows(unit)
                positive = pc.equal(rows["direction"], "positive")
                top.add(rows.filter(positive))
                bottom.add(rows.filter(pc.invert(positive)))
            kept = [top.result(), bottom.result()]
            for ranked in kept:
                _check_unique_documents(ranked)
            scores.write_all(score_rows(ranked, run_id, method, score.layer_scores) for ranked in kept)
            if tokens is not None:
                wanted = pa.chunked_array(pair_keys(kept[0]["query_id"], kept[0]["doc_id"])).combine_chunks()
                for unit in group.units:
                    tokens.write(_tokens_of(store.tokens_path(unit), wanted, run_id))
    return scores_path, tokens_path


def _tokens_of(path: Path, wanted: pa.Array, run_id: str) -> pa.Table:
    table = pq.read_table(path)
    table = table.filter(pc.is_in(pair_keys(table["query_id"], table["doc_id"]), value_set=wanted))
    return table.add_column(0, "run_id", pa.repeat(pa.scalar(run_id), table.num_rows))


def _check_unique_documents(ranked: pa.Table) -> None:
    """Streaming per shard cannot see an id repeated in another shard; the merged rows can."""
    keys = pair_keys(ranked["query_id"], ranked["doc_id"]).to_numpy(zero_copy_only=False)
    values, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        key = values[np.argmax(counts > 1)]
        shards = [shard for k, shard in zip(keys, ranked["shard"].to_pylist()) if k == key]
        doc_id = key.split("\x1f", 1)[1]
        raise DataError(f"duplicate id {doc_id!r}: in shard {shards[0]} and in shard {shards[1]}")


def publish_pairs(store: MarkerStore, failed: Sequence[WorkUnit], batches_of: dict[int, Sequence[int]], run_id: str,
                  output_dir: Path) -> Path:
    """Move the pairs files into ``pairs/run_id=<run_id>/`` (failed units' files left out); the directory."""
    source = store.pairs_directory
    source.mkdir(parents=True, exist_ok=True)
    for unit in failed:
        for index in batches_of[unit.group]:
            store.pairs_path(index, unit).unlink(missing_ok=True)
    for leftover in source.rglob(".*"):  # staging files of attempts that died mid-write
        if leftover.is_file():
            leftover.unlink()
    target = output_dir / "pairs" / f"run_id={run_id}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    return target


def remove_work(store: MarkerStore) -> None:
    """A finished run's work files, but its completion record (a rerun reads it back) and its lock."""
    for entry in store.directory.iterdir():
        if entry.name not in ("complete.json", store.lock_path.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
