"""Merge score tables into one top-k (and bottom-k) per query.

The top-k of a union of document sets is the top-k of the union of each set's top-k, so
merging the kept rows with a night's rows gives exactly the ranking one run over all the
shards would give. Rows are ordered by ``(-score, doc_id)`` (``(score, doc_id)`` for the
bottom), the tie-break :class:`attribution.scoring.topk.StreamingTopK` uses, on the stored
float64 ``score`` (re-summing float32 layer scores would perturb near-ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from attribution.data.corpus import DataError
from attribution.scoring.tables import SCORE_SCHEMA, TOKEN_SCHEMA

# The merged current table: the score table's columns and the night each row was swept.
CURRENT_SCHEMA = SCORE_SCHEMA.append(pa.field("sweep_date", pa.string()))


def with_sweep_date(table: pa.Table, sweep_date: str) -> pa.Table:
    """A group's part (SCORE_SCHEMA) with the night it was swept, as the current table holds it."""
    table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    return table.append_column("sweep_date", pa.array([sweep_date] * table.num_rows, pa.string()))


def merge_top(tables: Sequence[pa.Table], top_k: int, bottom_k: int) -> pa.Table:
    """The ``top_k`` positive and ``bottom_k`` negative rows per query over all ``tables``, re-ranked from 1.

    A document ranked twice for a query (an id in two shards, or the same shard in two
    tables) is an error naming both places: the tables must cover disjoint documents.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for table in tables:
        for row in table.select(CURRENT_SCHEMA.names).to_pylist():
            key = (row["query_id"], row["direction"], row["doc_id"])
            other = seen.setdefault(key, row)
            if other is not row:
                raise DataError(
                    f"document {row['doc_id']!r} was ranked twice for query {row['query_id']!r}: from shard "
                    f"{other['shard']} (swept {other['sweep_date']}) and from shard {row['shard']} (swept "
                    f"{row['sweep_date']}); document ids must be unique across the corpus"
                )
            groups.setdefault((row["query_id"], row["direction"]), []).append(row)
    merged = []
    for (query_id, direction), rows in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != "positive")):
        if direction == "positive":
            rows.sort(key=lambda r: (-r["score"], r["doc_id"]))
            kept = rows[:top_k]
        else:
            rows.sort(key=lambda r: (r["score"], r["doc_id"]))
            kept = rows[:bottom_k]
        merged += [{**row, "rank": rank} for rank, row in enumerate(kept, start=1)]
    return pa.Table.from_pylist(merged, schema=CURRENT_SCHEMA)


def merge_tokens(tables: Sequence[pa.Table], kept: pa.Table) -> pa.Table:
    """The token-score rows of ``kept``'s positive rows, from ``tables`` (each pair must be found once)."""
    wanted = {
        (row["query_id"], row["doc_id"]): row["run_id"]
        for row in kept.select(["query_id", "doc_id", "direction", "run_id"]).to_pylist()
        if row["direction"] == "positive"
    }
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for table in tables:
        for row in table.select(TOKEN_SCHEMA.names).to_pylist():
            pair = (row["query_id"], row["doc_id"])
            if pair in wanted and row["run_id"] == wanted[pair]:
                found.setdefault(pair, row)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise DataError(f"token scores missing for {len(missing)} kept row(s), e.g. query {missing[0][0]!r} "
                        f"document {missing[0][1]!r}; the token tables do not match the score tables")
    rows = [found[pair] for pair in sorted(found)]
    return pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA)
