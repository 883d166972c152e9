"""The tables of a score run (SPEC "Score table"), as Arrow: schemas, the vectorised top-k merge,
and Parquet written atomically, whole or in streamed row groups.

- score table ``scores/<run_id>.parquet``: the top-k (and bottom-k) rows per query;
- token table ``token_scores/<run_id>.parquet``: the token-wise scores of every top row;
- pairs dataset ``pairs/run_id=<run_id>/query_batch=<i>/<shard>.parquet`` (``score.top_k=all``):
  every (query, document) pair, unranked, one file per query batch and shard.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

# A unit's kept rows before the merge: ``query`` is the query's position in its pass, and
# ``ordinal`` (shard index * 2^40 + row) breaks ties so the merge equals a full sort.
UNIT_ROWS_SCHEMA = pa.schema(
    [
        ("direction", pa.string()),
        ("query", pa.int32()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("layer_scores", pa.list_(pa.float32())),
        ("shard", pa.string()),
        ("ordinal", pa.int64()),
    ]
)

UNIT_TOKENS_SCHEMA = TOKEN_SCHEMA.remove(TOKEN_SCHEMA.get_field_index("run_id"))


def pairs_schema(layer_scores: bool) -> pa.Schema:
    """Rows of the pairs dataset; ``row`` is the document's row in its shard."""
    fields = [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64())]
    if layer_scores:
        fields.append(("layer_scores", pa.list_(pa.float32())))
    return pa.schema(fields + [("shard", pa.string()), ("row", pa.int64())])


def float_lists(values: np.ndarray) -> pa.Array:
    """A (N, M) array as N float32 lists of length M, without a Python loop."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    count, width = values.shape
    offsets = pa.array(np.arange(count + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def strings(values: Sequence[str], indices: np.ndarray) -> pa.Array:
    """``values[indices]`` as a string array, gathered in Arrow."""
    return pa.array(values, pa.string()).take(pa.array(indices, pa.int64()))


def rank_rows(table: pa.Table, k: int, largest: bool) -> pa.Table:
    """The first ``k`` rows per ``query`` ordered by ``(-score, ordinal)`` (``(score, ordinal)``
    when not ``largest``), with their ``rank`` from 1: a full sort, vectorised.

    Ranking the union of tables' kept rows gives the ranking of the union of their
    documents: the top-k of a union is the top-k of the union of each part's top-k.
    """
    ordered = table.sort_by([("query", "ascending"), ("score", "descending" if largest else "ascending"),
                             ("ordinal", "ascending")])
    queries = ordered["query"].to_numpy()
    if len(queries) == 0:
        return ordered.append_column("rank", pa.array([], pa.int32()))
    starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])
    lengths = np.diff(np.r_[starts, len(queries)])
    rank = np.arange(len(queries)) - np.repeat(starts, lengths) + 1
    kept = rank <= k
    return ordered.filter(pa.array(kept)).append_column("rank", pa.array(rank[kept], pa.int32()))


class RankedMerge:
    """Folds unit tables of one direction into the top ``k`` per query, holding at most about
    ``2 x`` the final rows plus one unit at a time."""

    def __init__(self, k: int, largest: bool, num_queries: int) -> None:
        self.k = k
        self.largest = largest
        self.budget = max(1, 2 * k * num_queries)
        self._parts: list[pa.Table] = []
        self._rows = 0

    def add(self, rows: pa.Table) -> None:
        self._parts.append(rows)
        self._rows += rows.num_rows
        if self._rows > self.budget:
            self._reduce()

    def _reduce(self) -> None:
        merged = rank_rows(pa.concat_tables(self._parts), self.k, self.largest).drop_columns(["rank"])
        self._parts, self._rows = [merged], merged.num_rows

    def result(self) -> pa.Table:
        """Every kept row, per query in rank order, with ``rank``."""
        parts = self._parts or [UNIT_ROWS_SCHEMA.empty_table()]
        return rank_rows(pa.concat_tables(parts), self.k, self.largest)


def score_rows(ranked: pa.Table, run_id: str, method: str, layer_scores: bool) -> pa.Table:
    """Merged rows (:func:`rank_rows`) as score-table rows."""
    count = ranked.num_rows
    layers = ranked["layer_scores"] if layer_scores else pa.array([[]] * count, pa.list_(pa.float32()))
    return pa.table(
        {
            "run_id": pa.array([run_id] * count, pa.string()),
            "query_id": ranked["query_id"],
            "direction": ranked["direction"],
            "rank": ranked["rank"],
            "doc_id": ranked["doc_id"],
            "score": ranked["score"],
            "layer_scores": layers,
            "shard": ranked["shard"],
            "method": pa.array([method] * count, pa.string()),
        },
        schema=SCORE_SCHEMA,
    )


def pair_keys(query_ids: pa.ChunkedArray | pa.Array, doc_ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """One string per (query, document) pair, for vectorised membership tests."""
    return pc.binary_join_element_wise(query_ids, doc_ids, "\x1f")


def score_table(rows: Sequence[Ranked], run_id: str, direction: str, method: str) -> pa.Table:
    """Score-table rows from :class:`Ranked` rows (rankings made outside influence scoring)."""
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
    table = pq.read_table(path, filters=[("direction", "=", direction)]).sort_by([("query_id", "ascending"),
                                                                                  ("rank", "ascending")])
    ranked: dict[str, list[Ranked]] = {}
    columns = {name: table[name].to_pylist() for name in ("query_id", "rank", "doc_id", "shard", "score")}
    layers = table["layer_scores"].to_pylist()
    for index, query_id in enumerate(columns["query_id"]):
        ranked.setdefault(query_id, []).append(
            Ranked(query_id, columns["rank"][index], columns["doc_id"][index], columns["shard"][index],
                   columns["score"][index], np.asarray(layers[index], dtype=np.float32))
        )
    return ranked


def _staging(target: Path) -> Path:
    """A hidden sibling: readers of a dataset directory skip hidden files."""
    return target.with_name(f".{target.stem}.tmp-{uuid.uuid4().hex[:8]}")


def write_part(table: pa.Table, directory: str | Path, name: str) -> Path:
    """Write ``directory/name.parquet`` through a hidden temporary file and a rename."""
    target = Path(directory) / f"{name}.parquet"
    with StreamedTable(target, table.schema) as writer:
        writer.write(table)
    return target


class StreamedTable:
    """A Parquet file written in row groups (of about ``row_group_rows``) to a hidden staging
    file, renamed into place on a clean exit and removed on an error: no reader sees a partial file."""

    def __init__(self, target: str | Path, schema: pa.Schema, row_group_rows: int = 65536) -> None:
        self.target = Path(target)
        self.schema = schema
        self.rows = 0
        self.row_group_rows = row_group_rows
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._staging = _staging(self.target)
        self._writer = pq.ParquetWriter(self._staging, schema)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.select(self.schema.names).cast(self.schema))
            self._pending_rows += table.num_rows
            self.rows += table.num_rows
            if self._pending_rows >= self.row_group_rows:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=max(self._pending_rows, 1))
            self._pending, self._pending_rows = [], 0

    def write_all(self, tables: Iterable[pa.Table]) -> None:
        for table in tables:
            self.write(table)

    def __enter__(self) -> StreamedTable:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self._flush()
        self._writer.close()
        if kind is None:
            os.replace(self._staging, self.target)
        else:
            self._staging.unlink(missing_ok=True)
