"""The score workflow: query factors per query batch, one streamed pass over the corpus each, top-k tables.

Writes ``<output_dir>/scores/<run_id>.parquet``, ``<output_dir>/token_scores/<run_id>.parquet``
(with ``score.token_scores``) and ``<output_dir>/runs/<run_id>.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attribution.curvature.factors import identity_factors
from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet, Manifest, ModuleSpec, load_factors
from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import Skip, iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.data.stream import document_batches
from attribution.models import TrackedModule, find_tracked_modules, load_model, model_fingerprint
from attribution.runs import RunRecord
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import query_factors
from attribution.scoring.tables import TOKEN_SCHEMA, score_table, write_part
from attribution.scoring.topk import Ranked, StreamingTopK
from attribution.settings import (
    DataSettings,
    FactorSettings,
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


def identity_factor_set(tracked: Sequence[TrackedModule], fingerprint: str) -> FactorSet:
    """The gradient dot product needs no fitted store."""
    manifest = Manifest("identity", "true", fingerprint, [ModuleSpec.of(m) for m in tracked], 0, 0, {}, "float64")
    return FactorSet(manifest, {m.name: identity_factors(m.d_in_augmented, m.d_out, torch.float64, "cpu") for m in tracked})


def load_factor_set(settings: FactorSettings, tracked: list[TrackedModule], fingerprint: str, output_dir: Path) -> FactorSet:
    """The store to precondition with; ``factors.strategy=identity`` needs none."""
    if settings.strategy == "identity":
        return identity_factor_set(tracked, fingerprint)
    factors = load_factors(settings.path or output_dir / "factors", tracked, fingerprint)
    if factors.manifest.strategy != settings.strategy:
        raise SettingsError(
            f"factor store {settings.path or output_dir / 'factors'} holds {factors.manifest.strategy} factors, "
            f"but factors.strategy={settings.strategy}"
        )
    return factors


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
) -> ScoreSummary:
    if model_settings.path is None or data_settings.path is None or query_settings.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the jobs fill them in with the demo)")
    output_dir = Path(output_dir)
    record = RunRecord(job="score", config=config)
    device = resolve_device(model_settings.device)
    dtype = torch_dtype(score_settings.dtype)
    model, tokenizer = load_model(model_settings.path, model_settings.trust_remote_code, torch_dtype(model_settings.dtype), device)
    tracked = find_tracked_modules(model, model_settings.tracked_modules)
    fingerprint = model_fingerprint(model, tracked)
    factors = load_factor_set(factor_settings, tracked, fingerprint, output_dir)
    preconditioner = Preconditioner(factors, factor_settings.damping, device)
    method = factors.manifest.strategy
    record.fingerprints = {"model": fingerprint, "factors_created": factors.manifest.created}
    skip_once = _SkipOnce(record)
    queries = read_queries(query_settings.path, on_skip=skip_once)
    shards = list_shards(data_settings.path)
    record.lap("setup")

    positive: list[Ranked] = []
    negative: list[Ranked] = []
    token_rows: list[dict[str, Any]] = []
    counts = {"queries": len(queries), "queries_scored": 0, "documents_scored": 0, "query_batches": 0}
    for query_batch in batch_queries(tokenizer, queries, score_settings.query_batch_size, data_settings.max_length, skip_once):
        query_set, rejected = query_factors(model, tracked, query_batch.to(device), preconditioner.apply, score_settings.rank)
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
        "score": asdict(score_settings),
    }
    record.config["damping"] = preconditioner.damping
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
