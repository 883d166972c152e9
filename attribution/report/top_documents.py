"""A readable summary of a score run: each query, its top documents, and where its known sources rank."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from attribution.data.corpus import Skip, iter_documents
from attribution.data.queries import Query
from attribution.scoring.topk import Ranked


def document_texts(doc_ids: set[str], shards: Sequence[Path], id_field: str, text_field: str) -> dict[str, str]:
    """Texts of the given documents, read from the shards that hold them.

    Bad rows are passed over: the scoring pass met them first (and failed or recorded them),
    and none of them can be among the scored documents looked up here.
    """
    return {
        doc.id: doc.text
        for doc in iter_documents(shards, id_field, text_field, on_skip=_not_shown, on_bad_row="skip")
        if doc.id in doc_ids
    }


def reciprocal_rank(ranked: Sequence[Ranked], sources: Sequence[str]) -> float:
    """1 / rank of the first true source in the kept rows, 0 if none was kept."""
    for row in ranked:
        if row.doc_id in sources:
            return 1.0 / row.rank
    return 0.0


def recall_at(ranked: Sequence[Ranked], sources: Sequence[str], k: int = 10) -> float:
    """Share of the true sources among the first k rows."""
    top = {row.doc_id for row in ranked if row.rank <= k}
    return len(top & set(sources)) / len(sources)


def format_top_documents(queries: Sequence[Query], top: dict[str, list[Ranked]], texts: dict[str, str], show: int) -> str:
    lines = []
    with_sources = [q for q in queries if q.source_ids and q.id in top]
    for query in queries:
        if query.id not in top:
            continue
        lines.append(f"{query.id}: {query.prompt!r} -> {query.completion!r}")
        for row in top[query.id][:show]:
            marker = "*" if row.doc_id in query.source_ids else " "
            snippet = textwrap.shorten(texts.get(row.doc_id, ""), width=90, placeholder=" ...")
            lines.append(f"  {marker}{row.rank:>3}  {row.score:+.3e}  {row.doc_id}  {snippet}")
    if with_sources:
        mrr = sum(reciprocal_rank(top[q.id], q.source_ids) for q in with_sources) / len(with_sources)
        hits = sum(reciprocal_rank(top[q.id], q.source_ids) == 1.0 for q in with_sources)
        lines.append(
            f"(* = a true source) fact tracing over {len(with_sources)} queries: a true source ranked first for "
            f"{hits}, MRR within the kept top rows {mrr:.3f}"
        )
    return "\n".join(lines)


def _not_shown(skip: Skip) -> None:
    """The score run recorded skips already; the summary only reads texts."""
