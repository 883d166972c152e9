"""The score workflow: query factors per query batch, one streamed pass over the corpus each, top-k tables.

Writes ``<output_dir>/scores/<run_id>.parquet``, ``<output_dir>/token_scores/<run_id>.parquet``
(with ``score.token_scores``) and ``<output_dir>/runs/<run_id>.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import Skip, iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.data.stream import document_batches
from attribution.runs import RunRecord
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import query_factors
from attribution.scoring.stages import multi_stage, single_stage
from attribution.scoring.tables import TOKEN_SCHEMA, score_table, write_part
from attribution.scoring.topk import Ranked, StreamingTopK
from attribution.settings import (
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    QuerySettings,
    ScoreSettings,
    SettingsError,
    resolve_device,
    torch_dtype,
)

NON_FINITE_DOCUMENT = "non-finite influence score (NaN or Inf in the document's gradient)"
NON_FINITE_QUERY = "non-finite query gradient (NaN or Inf)"


@dataclass
class ScoreSummary:
    run_id: str
    method: str
    scores_path: Path
    token_scores_path: Path | None
    run_record: Path
    counts: dict[str, int]
    seconds: float
    top: dict[str, list[Ranked]] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"scored {self.counts['queries_scored']} queries x {self.counts['documents_scored']} documents "
            f"({self.method}) in {self.seconds:.1f} s -> {self.scores_path}"
        )


class _SkipOnce:
    """Records each skip once, although every query batch streams the corpus again."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.seen: set[tuple[str | None, str, str]] = set()

    def __call__(self, skip: Skip) -> None:
        key = (skip.item_id, skip.shard, skip.reason)
        if key not in self.seen:
            self.seen.add(key)
            self.record.skip(skip)


def run_score(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    query_settings: QuerySettings,
    score_settings: ScoreSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    finetune_settings: FinetuneSettings = FinetuneSettings(),
) -> ScoreSummary:
    if model_settings.path is None or data_settings.path is None or query_settings.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the jobs fill them in with the demo)")
    output_dir = Path(output_dir)
    record = RunRecord(job="score", config=config)
    device = resolve_device(model_settings.device)
    dtype = torch_dtype(score_settings.dtype)
    if finetune_settings.enabled:
        stages = multi_stage(model_settings, finetune_settings, factor_settings, output_dir, device)
    else:
        stages = single_stage(model_settings, factor_settings, output_dir, device)
    model, tokenizer, tracked, method = stages.candidate_model, stages.candidate_tokenizer, stages.tracked, stages.method
    record.fingerprints = stages.fingerprints
    record.config["modules"] = [m.name for m in tracked]
    record.config["excluded_modules"] = stages.excluded_modules
    skip_once = _SkipOnce(record)
    queries = read_queries(query_settings.path, on_skip=skip_once)
    shards = list_shards(data_settings.path)
    record.lap("setup")

    positive: list[Ranked] = []
    negative: list[Ranked] = []
    token_rows: list[dict[str, Any]] = []
    counts = {"queries": len(queries), "queries_scored": 0, "documents_scored": 0, "query_batches": 0}
    query_batches = batch_queries(stages.query_tokenizer, queries, score_settings.query_batch_size, data_settings.max_length, skip_once)
    for query_batch in query_batches:
        query_set, rejected = query_factors(
            stages.query_model, stages.query_tracked, query_batch.to(device), stages.precondition, score_settings.rank
        )
        for query_id in rejected:
            skip_once(Skip(query_id, str(query_settings.path), None, NON_FINITE_QUERY))
        if not query_set.query_ids:
            continue
        scorer = CandidateScorer(model, tracked, query_set, data_settings.max_length, dtype)
        record.config.setdefault("contraction_plan", scorer.plan)
        top = StreamingTopK(query_set.query_ids, score_settings.top_k, largest=True)
        bottom = StreamingTopK(query_set.query_ids, score_settings.bottom_k, largest=False)
        scored = 0
        batches = document_batches(tokenizer, shards, data_settings, skip_once)
        description = f"query batch {counts['query_batches'] + 1}"
        for batch in tqdm(batches, desc=description, unit="batch", disable=not score_settings.progress):
            kept, layers = _finite_rows(batch, scorer.layer_scores(batch.to(device)), skip_once)
            top.update([batch.ids[i] for i in kept], [batch.shards[i] for i in kept], layers)
            bottom.update([batch.ids[i] for i in kept], [batch.shards[i] for i in kept], layers)
            scored += len(kept)
        counts["documents_scored"] = scored
        counts["queries_scored"] += len(query_set.query_ids)
        counts["query_batches"] += 1
        positive += top.ranked()
        negative += bottom.ranked()
        if score_settings.token_scores:
            token_rows += token_score_rows(scorer, tokenizer, top.ranked(), data_settings, device)
    record.lap("score")

    run_id = record.run_id
    table = pa.concat_tables(
        [score_table(positive, run_id, "positive", method), score_table(negative, run_id, "negative", method)]
    )
    scores_path = write_part(table, output_dir / "scores", run_id)
    tokens_path = None
    if score_settings.token_scores:
        rows = [{"run_id": run_id, **row} for row in token_rows]
        tokens_path = write_part(pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA), output_dir / "token_scores", run_id)
    record.counts = {**counts, "skipped": len(record.skips), "shards": len(shards)}
    record.outputs = {"scores": str(scores_path), **({"token_scores": str(tokens_path)} if tokens_path else {})}
    record.config["resolved_settings"] = {
        "model": asdict(model_settings),
        "data": asdict(data_settings),
        "factors": asdict(factor_settings),
        "queries": asdict(query_settings),
        "finetune": asdict(finetune_settings),
        "score": asdict(score_settings),
    }
    record.config["damping"] = stages.damping
    record_path = record.write(output_dir)
    top_by_query: dict[str, list[Ranked]] = {}
    for row in positive:
        top_by_query.setdefault(row.query_id, []).append(row)
    return ScoreSummary(run_id, method, scores_path, tokens_path, record_path, record.counts,
                        sum(record.timings.values()), top_by_query)


def _finite_rows(batch: TokenBatch, layer_scores: torch.Tensor, on_skip: _SkipOnce) -> tuple[list[int], np.ndarray]:
    """Rows whose layer scores are all finite; the others become recorded skips, never rows."""
    layers = layer_scores.detach().to("cpu", torch.float64).numpy()
    finite = np.isfinite(layers).all(axis=(1, 2))
    for index in np.flatnonzero(~finite):
        on_skip(Skip(batch.ids[index], batch.shards[index], None, NON_FINITE_DOCUMENT))
    kept = np.flatnonzero(finite).tolist()
    return kept, layers[kept]


def token_score_rows(
    scorer: CandidateScorer,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Ranked],
    data_settings: DataSettings,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Token-wise scores of each query's top rows: a second pass over just those documents."""
    wanted: dict[str, list[str]] = {}
    for row in rows:
        wanted.setdefault(row.doc_id, []).append(row.query_id)
    if not wanted:
        return []
    query_index = {query_id: index for index, query_id in enumerate(scorer.query_ids)}
    shards = sorted({Path(row.shard) for row in rows})
    documents = (
        doc
        for doc in iter_documents(shards, data_settings.id_field, data_settings.text_field, on_skip=_already_recorded)
        if doc.id in wanted
    )
    result = []
    for batch in batch_documents(tokenizer, documents, data_settings.batch_size, data_settings.max_length, _already_recorded):
        contributions = scorer.token_scores(batch.to(device)).detach().to("cpu", torch.float32).numpy()
        for b, doc_id in enumerate(batch.ids):
            length = int(batch.attention_mask[b].sum())
            tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[b, :length].tolist())
            for query_id in wanted[doc_id]:
                result.append({
                    "query_id": query_id,
                    "doc_id": doc_id,
                    "tokens": tokens,
                    "token_scores": contributions[b, :length, query_index[query_id]],
                })
    return result


def _already_recorded(skip: Skip) -> None:
    """The scoring pass recorded this skip; the token pass reads the same documents again."""
