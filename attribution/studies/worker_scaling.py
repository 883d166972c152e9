"""Fit and score throughput with 1, 2, ... Ray workers on the same inputs, and each worker's peak memory.

Every run goes through Ray (even with one worker), so the ratio ``throughput(n) / throughput(1)``
compares like with like: the same process startup, model loading and Ray scheduling per run.
Throughput is sequences fitted (per pass over the sample, three passes) or documents scored
per wall-clock second of the whole job, what a user waits for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from attribution.fitting import run_fit
from attribution.scoring.run import run_score
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings


@dataclass(frozen=True)
class ScalingRow:
    stage: str
    workers: int
    seconds: float
    items: int
    items_per_second: float
    speedup: float
    peak_memory_mib: list[float]


def _peaks(run_record: Path) -> list[float]:
    return [worker["peak_memory_mib"] for worker in json.loads(run_record.read_text())["config"].get("workers", [])]


def run_scaling(model: ModelSettings, data: DataSettings, queries: QuerySettings, score: ScoreSettings,
                factors: FactorSettings, worker_counts: list[int], output_dir: Path) -> list[ScalingRow]:
    """Fit, then score with the factors of the first fit, once per worker count; each in its own directory."""
    timings: dict[str, list[tuple[int, float, int, list[float]]]] = {"fit": [], "score": []}
    store = None
    for workers in worker_counts:
        cluster = ClusterSettings(num_workers=workers)
        directory = output_dir / f"workers-{workers}-{time.strftime('%Y%m%dT%H%M%S')}"
        started = time.perf_counter()
        fit = run_fit(model, data, replace(factors, path=str(directory / "factors")), directory, {},
                      progress=False, cluster=cluster)
        timings["fit"].append((workers, time.perf_counter() - started, fit.num_sequences, _peaks(fit.run_record)))
        store = store or fit.factors_path
        started = time.perf_counter()
        scored = run_score(model, data, replace(factors, path=str(store)), queries, score,
                           directory, {}, cluster=cluster)
        timings["score"].append((workers, time.perf_counter() - started, scored.counts["documents_scored"], _peaks(scored.run_record)))
    rows = []
    for stage, runs in timings.items():
        base = runs[0][2] / runs[0][1]
        for workers, seconds, items, peaks in runs:
            rate = items / seconds
            rows.append(ScalingRow(stage, workers, seconds, items, rate, rate / base, peaks))
    return rows


def format_table(rows: list[ScalingRow]) -> str:
    lines = ["| stage | workers | seconds | items | items/s | speed-up | peak MiB per worker |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.stage} | {r.workers} | {r.seconds:.1f} | {r.items} | {r.items_per_second:.1f} | {r.speedup:.2f} | "
              f"{', '.join(f'{p:.0f}' for p in r.peak_memory_mib)} |" for r in rows]
    return "\n".join(lines)
