"""The score workflow: query factors per query batch, (query batch, shard) units, merged top-k tables.

Writes ``<output_dir>/scores/<run_id>.parquet``, ``<output_dir>/token_scores/<run_id>.parquet``
(with ``score.token_scores``) and ``<output_dir>/runs/<run_id>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from attribution.data.batching import batch_documents, batch_queries
from attribution.data.corpus import DataError, Skip, iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.prefilter.candidates import retrieve_candidates
from attribution.runs import RunRecord
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.execution import run_in_process, run_on_ray
from attribution.scoring.markers import MarkerStore, UnitResult, WorkUnit, file_fingerprint, run_key
from attribution.scoring.shards import ShardScorer
from attribution.scoring.stages import build_stages
from attribution.scoring.tables import TOKEN_SCHEMA, read_ranked, score_table, write_part
from attribution.scoring.topk import Ranked, StreamingTopK
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
    resolve_device,
)

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
    # True when a finished run with the same inputs was found and nothing was scored again.
    reused: bool = False

    def line(self) -> str:
        if self.reused:
            return f"already scored with the same inputs by run {self.run_id}: nothing to do -> {self.scores_path}"
        return (
            f"scored {self.counts['queries_scored']} queries x {self.counts['documents_scored']} documents "
            f"({self.method}) in {self.seconds:.1f} s -> {self.scores_path}"
        )


def finished_summary(run_record: Path, method: str) -> ScoreSummary:
    """The summary of a finished run, read back from its record and score table."""
    record = json.loads(run_record.read_text())
    outputs = record["outputs"]
    scores_path = Path(outputs["scores"])
    tokens_path = Path(outputs["token_scores"]) if "token_scores" in outputs else None
    return ScoreSummary(record["run_id"], method, scores_path, tokens_path, run_record, record["counts"],
                        sum(record["timings"].values()), read_ranked(scores_path), reused=True)


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


class ShardFailure(RuntimeError):
    """Shards that failed on every attempt; the run record lists them with their errors."""


def run_score(
    model_settings: ModelSettings,
    data_settings: DataSettings,
    factor_settings: FactorSettings,
    query_settings: QuerySettings,
    score_settings: ScoreSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    finetune_settings: FinetuneSettings = FinetuneSettings(),
    prefilter_settings: PrefilterSettings = PrefilterSettings(),
    cluster: ClusterSettings = ClusterSettings(num_workers=0),
    shards: Sequence[Path] | None = None,
    refine_settings: RefineSettings = RefineSettings(),
) -> ScoreSummary:
    """Score every query against the corpus (or its prefilter candidates) and write the tables.

    ``shards`` restricts the run to these shards (the nightly sweep's new ones) instead of
    every shard of ``data.path``.

    Work is split into (query batch, shard) units run in this process or on a Ray pool; each
    finished unit leaves a completion marker, so a rerun resumes, and a run already finished
    with the same inputs is not repeated: its summary is read back from its outputs.
    """
    if model_settings.path is None or data_settings.path is None or query_settings.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the jobs fill them in with the demo)")
    if score_settings.method == "prefilter":
        # Imported here: that module builds its summary on this one.
        from attribution.prefilter.scores import run_prefilter_scores

        return run_prefilter_scores(data_settings, query_settings, score_settings, prefilter_settings, output_dir, config)
    output_dir = Path(output_dir)
    record = RunRecord(job="score", config=config)
    device = resolve_device(model_settings.device)
    stages = build_stages(model_settings, factor_settings, finetune_settings, refine_settings, output_dir, device)
    record.fingerprints = stages.fingerprints
    record.config["modules"] = [m.name for m in stages.tracked]
    record.config["excluded_modules"] = stages.excluded_modules
    skip_once = _SkipOnce(record)
    shards = list(shards) if shards is not None else list_shards(data_settings.path)
    # The run key needs no query factors: a finished run is found before any are computed.
    markers = MarkerStore(output_dir, run_key({
        "fingerprints": stages.fingerprints,
        "modules": record.config["modules"],
        "damping": stages.damping,
        "queries": [file_fingerprint(path) for path in list_shards(query_settings.path)],
        "shards": [file_fingerprint(shard) for shard in shards],
        "data": asdict(data_settings),
        "score": {**asdict(score_settings), "progress": None},
        "prefilter": asdict(prefilter_settings),
        "refine": asdict(refine_settings),
    }))
    finished_record = markers.complete()
    if finished_record is not None:
        return finished_summary(finished_record, stages.method)
    queries = read_queries(query_settings.path, on_skip=skip_once)
    # Per query, the documents influence may rank (None: all); a unit scores their union once.
    candidates = retrieve_candidates(prefilter_settings, queries, shards, output_dir)
    query_sets = []
    query_batches = batch_queries(stages.query_tokenizer, queries, score_settings.query_batch_size, data_settings.max_length, skip_once)
    for query_batch in query_batches:
        prepared = stages.query_factors(query_batch, score_settings.rank)
        for query_id in prepared.rejected:
            skip_once(Skip(query_id, str(query_settings.path), None, NON_FINITE_QUERY))
        if prepared.factors.query_ids:
            query_sets.append(prepared.factors)
    record.lap("setup")

    units = []
    for index, query_set in enumerate(query_sets):
        holding = None if candidates is None else set(candidates.union(query_set.query_ids).values())
        units += [WorkUnit(index, str(shard)) for shard in shards if holding is None or str(shard) in holding]
    pending = [unit for unit in units if not markers.done(unit)]
    local = ShardScorer(stages.candidate_model, stages.candidate_tokenizer, stages.tracked, query_sets, data_settings,
                        score_settings, candidates)
    progress = tqdm(total=len(pending), desc="score units (query batch x shard)", unit="unit", disable=not score_settings.progress)

    def finished(result: UnitResult) -> None:
        markers.write(result)
        progress.update()

    if cluster.uses_ray and pending:
        failures, peaks = run_on_ray(cluster, model_settings, record.config["modules"], query_sets, data_settings,
                                     score_settings, candidates, pending, finished)
        record.config["workers"] = [{"peak_memory_mib": round(peak, 1)} for peak in peaks]
    else:
        failures = run_in_process(local, pending, cluster.max_retries, finished)
    progress.close()
    record.lap("score")

    positive: list[Ranked] = []
    negative: list[Ranked] = []
    token_rows: list[dict[str, Any]] = []
    counts = {"queries": len(queries), "queries_scored": sum(len(q.query_ids) for q in query_sets),
              "query_batches": len(query_sets), "units": len(units), "units_resumed": len(units) - len(pending),
              "documents_scored": 0}
    for index, query_set in enumerate(query_sets):
        top = StreamingTopK(query_set.query_ids, score_settings.top_k, largest=True)
        bottom = StreamingTopK(query_set.query_ids, score_settings.bottom_k, largest=False)
        scored = 0
        for unit in units:
            if unit.query_batch != index or unit in failures:
                continue
            result = markers.read(unit)
            for skip in result.skips:
                skip_once(skip)
            top.merge(result.positive)
            bottom.merge(result.negative)
            scored += result.documents_scored
        counts["documents_scored"] = max(counts["documents_scored"], scored)
        positive += _unique_documents(top.ranked())
        negative += bottom.ranked()
        if score_settings.token_scores:
            token_rows += token_score_rows(local.scorer(index), stages.candidate_tokenizer, top.ranked(), data_settings, device)
    record.lap("merge")

    record.counts = {**counts, "skipped": len(record.skips), "shards": len(shards)}
    if candidates is not None:
        record.counts.update(candidates.counts())
        record.config["prefilter_candidates"] = candidates.describe()
    record.config["failed_units"] = [{"query_batch": u.query_batch, "shard": u.shard, "error": e} for u, e in failures.items()]
    record.config["contraction_plan"] = local.scorer(0).plan if query_sets else {}
    record.config["resolved_settings"] = {
        "model": asdict(model_settings),
        "data": asdict(data_settings),
        "factors": asdict(factor_settings),
        "queries": asdict(query_settings),
        "finetune": asdict(finetune_settings),
        "score": asdict(score_settings),
        "prefilter": asdict(prefilter_settings),
        "refine": asdict(refine_settings),
        "cluster": asdict(cluster),
    }
    record.config["damping"] = stages.damping
    if failures and not cluster.allow_failed_shards:
        record_path = record.write(output_dir)
        shard_list = ", ".join(sorted({u.shard for u in failures}))
        raise ShardFailure(f"{len(failures)} unit(s) failed on every attempt (shards: {shard_list}); nothing was written "
                           f"but the run record {record_path}; rerun to retry them, or set cluster.allow_failed_shards=true")

    run_id = record.run_id
    table = pa.concat_tables(
        [score_table(positive, run_id, "positive", stages.method), score_table(negative, run_id, "negative", stages.method)]
    )
    scores_path = write_part(table, output_dir / "scores", run_id)
    tokens_path = None
    if score_settings.token_scores:
        rows = [{"run_id": run_id, **row} for row in token_rows]
        tokens_path = write_part(pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA), output_dir / "token_scores", run_id)
    record.outputs = {"scores": str(scores_path), **({"token_scores": str(tokens_path)} if tokens_path else {})}
    record_path = record.write(output_dir)
    markers.mark_complete(record_path)
    top_by_query: dict[str, list[Ranked]] = {}
    for row in positive:
        top_by_query.setdefault(row.query_id, []).append(row)
    return ScoreSummary(run_id, stages.method, scores_path, tokens_path, record_path, record.counts,
                        sum(record.timings.values()), top_by_query)


def _unique_documents(rows: list[Ranked]) -> list[Ranked]:
    """Per-shard streaming cannot see an id repeated in another shard; the merged rows can."""
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        other = seen.setdefault((row.query_id, row.doc_id), row.shard)
        if other != row.shard:
            raise DataError(f"duplicate id {row.doc_id!r}: in shard {other} and in shard {row.shard}")
    return rows


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
