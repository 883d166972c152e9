"""Scoring with the model sharded over W Ray workers against the same run unsharded, on a rehearsal model.

One fit (in this process), then two score runs of the same queries against the same corpus, written
as W shards: a pool of W workers that each hold the whole model (``cluster.sharding=none``), and W
workers that hold 1/W of it each (``cluster.sharding=fsdp``). Per run: seconds, each worker's peak
resident memory and the parameter elements it holds; and the largest difference between the two
tables' scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from attribution.fitting import run_fit
from attribution.models import load_model
from attribution.scale.rehearsal import build_model_directory, write_corpus, write_queries
from attribution.scoring.run import run_score
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings


@dataclass
class ShardedRun:
    sharding: str
    seconds: float
    peak_mib: list[float]  # per worker
    parameters_held: list[int]  # per worker
    parameters: int  # of the whole model


@dataclass
class ShardingComparison:
    model: str
    workers: int
    runs: list[ShardedRun]
    largest_score_difference: float  # over every (query, document) pair, sharded vs not
    largest_score: float


def compare_sharding(name: str, root: Path, engine: str, workers: int, documents: int, sequence: int, batch_size: int,
                     queries: int, query_tokens: int, rank: int, dtype: str) -> ShardingComparison:
    """Fit rehearsal ``name`` once, then score it unsharded and sharded with ``engine`` over ``workers`` workers."""
    directory = build_model_directory(name, root / "rehearsal" / name)
    corpus = root / f"sharding-corpus-{documents}x{sequence}"
    if not corpus.is_dir():
        staging = corpus.with_name(corpus.name + ".partial")
        lines = write_corpus(staging / "all.jsonl", documents, sequence).read_text().splitlines(keepends=True)
        (staging / "all.jsonl").unlink()
        per_shard = -(-documents // workers)
        for index in range(workers):
            (staging / f"shard-{index}.jsonl").write_text("".join(lines[index * per_shard:(index + 1) * per_shard]))
        staging.rename(corpus)
    query_file = write_queries(root / f"sharding-queries-{queries}x{query_tokens}.jsonl", queries, query_tokens // 2,
                               query_tokens - query_tokens // 2)
    model = ModelSettings(path=str(directory), device="cpu", dtype=dtype)
    data = DataSettings(path=str(corpus), batch_size=batch_size, max_length=sequence + 1)
    fit = run_fit(model, data, FactorSettings(path=str(root / f"sharding-factors-{name}-{dtype}")), root / "sharding-fit", {},
                  progress=False)
    factors = FactorSettings(path=str(fit.factors_path))
    score = ScoreSettings(rank=rank, top_k="all", query_batch_size=queries, progress=False, token_scores=False,
                          layer_scores=False)
    parameters = sum(parameter.numel() for parameter in load_model(directory)[0].parameters())
    runs, tables = [], []
    for sharding in ("none", engine):
        summary = run_score(model, data, factors, QuerySettings(str(query_file)), score, root / f"sharding-score-{sharding}", {},
                            cluster=ClusterSettings(num_workers=workers, sharding=sharding))
        records = json.loads(summary.run_record.read_text())["config"]["workers"]
        runs.append(ShardedRun(sharding, summary.seconds, [r["peak_memory_mib"] for r in records],
                               [r.get("parameters_held", parameters) for r in records], parameters))
        table = pq.read_table(summary.scores_path, columns=["query_id", "doc_id", "score"]).to_pydict()
        tables.append(dict(zip(zip(table["query_id"], table["doc_id"]), table["score"])))
    unsharded, sharded = tables
    if unsharded.keys() != sharded.keys():
        raise RuntimeError(f"the sharded run scored other pairs than the unsharded one: {len(sharded)} vs {len(unsharded)}")
    difference = max(abs(sharded[pair] - unsharded[pair]) for pair in unsharded)
    return ShardingComparison(name, workers, runs, difference, max(abs(value) for value in unsharded.values()))


def format_comparison(result: ShardingComparison) -> str:
    lines = [f"{result.model}: scoring over {result.workers} workers, the model whole in each or sharded",
             f"  {'sharding':<9} {'seconds':>8} {'peak MiB per worker':>22} {'weights held per worker':>24}"]
    for run in result.runs:
        held = ", ".join(f"{h / run.parameters:.2f}" for h in run.parameters_held)
        peaks = ", ".join(f"{p:.0f}" for p in run.peak_mib)
        lines.append(f"  {run.sharding:<9} {run.seconds:>8.1f} {peaks:>22} {held:>24}")
    lines.append(f"  largest score difference, sharded vs not: {result.largest_score_difference:.3g} "
                 f"(largest score {result.largest_score:.3g})")
    return "\n".join(lines)


def run_sharding_comparison(name: str, output_dir: Path, say: Callable[[str], None], **settings) -> ShardingComparison:
    """:func:`compare_sharding`, kept in ``output_dir/sharding-<model>-<dtype>.json``: a rerun with the same
    settings reads it back."""
    record = output_dir / f"sharding-{name}-{settings['dtype']}.json"
    if record.is_file() and json.loads(record.read_text())["settings"] == settings:
        raw = json.loads(record.read_text())["result"]
        result = ShardingComparison(raw["model"], raw["workers"], [ShardedRun(**run) for run in raw["runs"]],
                                    raw["largest_score_difference"], raw["largest_score"])
    else:
        say(f"scoring {name} sharded ({settings['engine']}) and unsharded ...")
        result = compare_sharding(name, output_dir, **settings)
        record.write_text(json.dumps({"settings": settings, "result": asdict(result)}, indent=2) + "\n")
    say(format_comparison(result))
    return result
