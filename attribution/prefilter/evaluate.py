"""Measure the prefilters on the demo fact benchmark: recall of true sources, build and query speed.

    OMP_NUM_THREADS=1 python -m attribution.prefilter.evaluate [--output DIR] [--copies N] [--variants ...]

For each variant it builds a fresh index of the demo corpus, then retrieves the top M for
every demo query (prompt + completion): the cloze queries of the pretrained model
(``queries.jsonl``) and the question-answer queries of the fine-tuned one
(``finetune_queries.jsonl``). Recall@M (``R@M``) is the share of a query's ``source_ids``
(the documents that state its fact) found in its top M, averaged over a query set. Build speed
is documents per second of the whole build (reading, encoding, writing; for dense, loading
the model too); query latency is the time of one batched ``top_m`` over all queries at the
largest M, per query, after a warm-up call. ``--copies N`` indexes N copies of the corpus
(ids suffixed) to time larger builds; recall is then not reported (copies tie with sources).
Prints a Markdown table and writes ``<output>/prefilter_evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import Query, read_queries
from attribution.demo.train import ensure_demo
from attribution.prefilter.candidates import query_text
from attribution.prefilter.index import open_index, update_index
from attribution.settings import DataSettings, PrefilterSettings

# The demo has ~800 documents: IVF gets few cells, and must scan most of them (see tests/prefilter/test_dense.py).
VARIANTS = {
    "tfidf": PrefilterSettings(kind="tfidf"),
    "bm25": PrefilterSettings(kind="bm25"),
    "dense-flat": PrefilterSettings(kind="dense", index_type="flat"),
    "dense-ivf": PrefilterSettings(kind="dense", index_type="ivf", nlist=16, nprobe=10),
    "dense-hnsw": PrefilterSettings(kind="dense", index_type="hnsw", hnsw_m=32, ef_construction=200, ef_search=128),
}
CUTOFFS = (10, 100, 1000)


def copied_corpus(source: Path, target: Path, copies: int) -> list[Path]:
    """``copies`` copies of every shard, ids suffixed ``~k``, as Parquet under ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for shard in list_shards(source):
        rows = [{"id": doc.id, "text": doc.text} for doc in iter_documents([shard], on_skip=lambda skip: None)]
        for copy in range(copies):
            table = pa.Table.from_pylist([{"id": f"{row['id']}~{copy}", "text": row["text"]} for row in rows])
            pq.write_table(table, target / f"{shard.stem}-copy{copy:04d}.parquet")
    return list_shards(target)


def measure(
    name: str, settings: PrefilterSettings, shards: list[Path], output: Path, query_sets: dict[str, list[Query]], recall: bool
) -> dict[str, Any]:
    """Build a fresh index of ``shards`` under ``output/name``, time it and a batched query, and measure recall."""
    directory = output / name
    shutil.rmtree(directory, ignore_errors=True)
    summary = update_index(directory, replace(settings, path=str(directory)), DataSettings(), shards, on_skip=lambda skip: None)
    index = open_index(directory, settings, shards)
    queries = [query for queries in query_sets.values() for query in queries]
    texts = [query_text(query) for query in queries]
    index.top_m(texts[:1], max(CUTOFFS))  # warm-up: loads the encoder for dense
    started = time.perf_counter()
    hits = dict(zip([query.id for query in queries], index.top_m(texts, max(CUTOFFS))))
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "variant": name,
        "documents": summary.documents,
        "build documents/s": round(summary.documents / summary.seconds, 1),
        "query ms": round(1000 * seconds / len(texts), 2),
    }
    for set_name, members in query_sets.items():
        for m in CUTOFFS if recall else ():
            shares = [len(set(q.source_ids) & {h.doc_id for h in hits[q.id][:m]}) / len(q.source_ids) for q in members]
            result[f"{set_name} R@{m}"] = round(sum(shares) / len(shares), 3)
    return result


def table(results: list[dict[str, Any]]) -> str:
    columns = [c for c in results[0] if c != "documents"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/prefilter_evaluation"))
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    demo = ensure_demo()
    query_sets = {
        name: [q for q in read_queries(path, on_skip=lambda skip: None) if q.source_ids]
        for name, path in (("cloze", demo.queries_path), ("question", demo.finetune_queries_path))
    }
    shards = list_shards(demo.corpus_dir)
    if args.copies > 1:
        shards = copied_corpus(demo.corpus_dir, args.output / "corpus", args.copies)
    results = [measure(name, VARIANTS[name], shards, args.output, query_sets, args.copies == 1) for name in args.variants]
    counts = ", ".join(f"{len(members)} {name}" for name, members in query_sets.items())
    print(f"demo queries: {counts}; {results[0]['documents']} documents\n")
    print(table(results))
    (args.output / "prefilter_evaluation.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
