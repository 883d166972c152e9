"""``score.method=prefilter``: the prefilter's own ranking written as a score table, for comparison.

Same schema as influence scores (SPEC "Score table"): the top ``score.top_k`` documents per
query by retrieval score, direction ``positive``, ``method`` = the index kind, ``layer_scores``
empty (retrieval has no per-module split). No model is loaded, but for ``gradient``, whose
queries are sketched from their preconditioned gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from attribution.data.corpus import list_shards
from attribution.data.queries import read_queries
from attribution.prefilter.candidates import search
from attribution.prefilter.index import open_index
from attribution.prefilter.manifest import IndexManifest
from attribution.runs import RunRecord
from attribution.scoring.summary import ScoreSummary
from attribution.scoring.tables import score_table, write_part
from attribution.scoring.topk import Ranked
from attribution.settings import DataSettings, PrefilterSettings, QuerySettings, ScoreSettings, SettingsError
from attribution.sketch.index import QuerySketches


def run_prefilter_scores(
    data: DataSettings,
    queries: QuerySettings,
    score: ScoreSettings,
    prefilter: PrefilterSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    query_sketches: Callable[[IndexManifest, Path], QuerySketches] | None = None,
) -> ScoreSummary:
    """``query_sketches(manifest, directory)`` loads what sketches queries for a gradient index."""
    if prefilter.kind == "none":
        raise SettingsError("score.method=prefilter needs prefilter.kind=tfidf, bm25, dense or gradient (and its index)")
    if data.path is None or queries.path is None:
        raise SettingsError("data.path and queries.path must be set (the jobs fill them in with the demo)")
    output_dir = Path(output_dir)
    record = RunRecord(job="score", config=config)
    query_list = read_queries(queries.path, on_skip=record.skip)
    directory = prefilter.index_path(output_dir)
    index = open_index(directory, prefilter, list_shards(data.path))
    sketches = query_sketches(index.manifest, directory) if query_sketches is not None and prefilter.kind == "gradient" else None
    record.lap("setup")
    hits = search(index, query_list, score.top_k, sketches)
    record.lap("score")
    no_layers = np.empty(0, dtype=np.float32)
    rows = [Ranked(query.id, rank, hit.doc_id, hit.shard, hit.score, no_layers)
            for query, found in zip(query_list, hits) for rank, hit in enumerate(found, 1)]
    scores_path = write_part(score_table(rows, record.run_id, "positive", prefilter.kind), output_dir / "scores", record.run_id)
    searched = sum(index.manifest.shards[position].documents for position in index.selection)
    record.counts = {
        "queries": len(query_list), "queries_scored": len(query_list), "documents_scored": searched,
        "pairs_scored": len(query_list) * searched, "rows": len(rows)
    }
    record.fingerprints = {"prefilter_encoder": index.manifest.encoder_fingerprint}
    record.outputs = {"scores": str(scores_path)}
    record.config["resolved_settings"] = {
        "data": asdict(data), "queries": asdict(queries), "score": asdict(score), "prefilter": asdict(prefilter)
    }
    record_path = record.write(output_dir)
    seconds = sum(record.timings.values())
    return ScoreSummary(record.run_id, prefilter.kind, scores_path, None, record_path, record.counts, seconds)
