"""Whole-job benchmarks: ``jobs.score`` end to end, each run a fresh process, as a user runs it.

- :func:`benchmark_inputs`: a corpus of N documents and Q queries for the demo model (the demo
  corpus repeated under new ids; queries are the demo's, then document openings and the words
  that follow them);
- :func:`score_job` / :func:`fit_job`: one ``jobs.score`` / ``jobs.fit_factors`` process, timed, with
  the run record's stage timings, counts and peak memory of the driver and each worker;
- :func:`kronfluence_job`: ``benchmarks/kronfluence_side_by_side.py`` on the same inputs (needs the
  optional ``bench`` extra), and :func:`agreement` of its scores with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries

REPOSITORY = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPOSITORY / "benchmarks" / "kronfluence_side_by_side.py"


@dataclass(frozen=True)
class BenchmarkInputs:
    model: Path
    corpus: Path
    queries: Path
    documents: int
    num_queries: int


@dataclass
class JobRun:
    """One job process: wall-clock seconds, and what its run record says."""

    label: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    driver_peak_mib: float | None = None
    worker_peak_mib: list[float] = field(default_factory=list)
    record: Path | None = None
    output: Path | None = None


def benchmark_inputs(directory: Path, model: Path, demo_corpus: Path, demo_queries: Path, documents: int, queries: int,
                     shards: int) -> BenchmarkInputs:
    """``documents`` demo documents (repeated under new ids) in ``shards`` Parquet shards, and ``queries`` queries."""
    corpus = directory / f"corpus-{documents}-{shards}"
    query_path = directory / f"queries-{queries}.jsonl"
    source = list(iter_documents(list_shards(demo_corpus), on_skip=lambda skip: None))
    if not corpus.is_dir():
        rows = [{"id": f"{source[i % len(source)].id}-{i // len(source)}", "text": source[i % len(source)].text}
                for i in range(documents)]
        staging = directory / f".{corpus.name}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        per_shard = -(-documents // shards)
        for index in range(shards):
            pq.write_table(pa.Table.from_pylist(rows[index * per_shard:(index + 1) * per_shard]),
                           staging / f"shard-{index:04d}.parquet")
        os.replace(staging, corpus)
    if not query_path.is_file():
        chosen = [{"id": q.id, "prompt": q.prompt, "completion": q.completion}
                  for q in read_queries(demo_queries, on_skip=lambda skip: None)][:queries]
        for document in source:
            if len(chosen) >= queries:
                break
            words = document.text.split()
            if len(words) >= 8:
                chosen.append({"id": f"open-{document.id}", "prompt": " ".join(words[:6]),
                               "completion": " " + " ".join(words[6:8])})
        query_path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return BenchmarkInputs(model, corpus, query_path, documents, queries)


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPOSITORY, env=_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _read_record(run: JobRun, output: Path) -> JobRun:
    records = sorted((output / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(records[-1].read_text())
    run.timings, run.counts, run.record, run.output = record["timings"], record["counts"], records[-1], output
    run.driver_peak_mib = record["config"].get("driver_peak_memory_mib")
    run.worker_peak_mib = [w["peak_memory_mib"] for w in record["config"].get("workers", [])]
    return run


def fit_job(label: str, inputs: BenchmarkInputs, store: Path, output: Path, *overrides: str) -> JobRun:
    command = [sys.executable, "-m", "jobs.fit_factors", f"model.path={inputs.model}", f"data.path={inputs.corpus}",
               f"factors.path={store}", f"output_dir={output}", "cluster.num_workers=0", *overrides]
    return _read_record(JobRun(label, _run(command)), output)


def score_job(label: str, inputs: BenchmarkInputs, store: Path, output: Path, *overrides: str) -> JobRun:
    command = [sys.executable, "-m", "jobs.score", f"model.path={inputs.model}", f"data.path={inputs.corpus}",
               f"queries.path={inputs.queries}", f"factors.path={store}", f"output_dir={output}", "score.progress=false",
               *overrides]
    return _read_record(JobRun(label, _run(command)), output)


def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def kronfluence_job(inputs: BenchmarkInputs, output: Path, rank: int, max_length: int, batch_size: int,
                    query_batch_size: int, fit_sequences: int | None, top_k: int) -> tuple[JobRun, dict]:
    command = [sys.executable, str(PEER_SCRIPT), "--model", str(inputs.model), "--corpus", str(inputs.corpus),
               "--queries", str(inputs.queries), "--output", str(output), "--rank", str(rank), "--max-length",
               str(max_length), "--batch-size", str(batch_size), "--query-batch-size", str(query_batch_size),
               "--top-k", str(top_k)] + (["--fit-sequences", str(fit_sequences)] if fit_sequences else [])
    seconds = _run(command)
    summary = json.loads((output / "kronfluence.json").read_text())
    return JobRun("kronfluence", seconds, {k: round(v, 3) for k, v in summary["seconds"].items()}), summary


def agreement(pairs_dataset: Path, peer_output: Path) -> float:
    """Mean over queries of the Spearman correlation of our scores with the peer's negated ones
    (its score is taken on the training loss ``-log p(z)``)."""
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    summary = json.loads((peer_output / "kronfluence.json").read_text())
    peer = -load_file(peer_output / "kronfluence_scores.safetensors")["scores"].double().numpy()
    column = {doc_id: index for index, doc_id in enumerate(summary["doc_ids"])}
    row = {query_id: index for index, query_id in enumerate(summary["query_ids"])}
    ours = np.full(peer.shape, np.nan)
    table = pq.read_table(pairs_dataset, columns=["query_id", "doc_id", "score"]).to_pydict()
    for query_id, doc_id, score in zip(table["query_id"], table["doc_id"], table["score"]):
        ours[row[query_id], column[doc_id]] = score
    return float(np.mean([spearmanr(ours[q], peer[q]).statistic for q in range(peer.shape[0])]))


@dataclass
class SuiteRow:
    """One line of the whole-job tables: what ran, its figure, and the target it is held to."""

    section: str
    measure: str
    value: str
    detail: str = ""


def _peak(run: JobRun) -> str:
    workers = ", ".join(f"{p:.0f}" for p in run.worker_peak_mib) or "-"
    return f"driver {run.driver_peak_mib:.0f} MiB, workers {workers} MiB"


def end_to_end(root: Path, inputs: BenchmarkInputs, rank: int, query_batch_size: int, top_k: int,
               fit_sequences: int, max_length: int, batch_size: int) -> list[SuiteRow]:
    """jobs.fit_factors + jobs.score (all pairs, then top-k) against kronfluence on the same inputs."""
    store = root / "factors"
    common = [f"score.rank={rank}", f"score.query_batch_size={query_batch_size}", "score.token_scores=false",
              "cluster.num_workers=0", f"data.max_length={max_length}", f"data.batch_size={batch_size}"]
    fit = fit_job("fit", inputs, store, root / "fit", f"factors.max_sequences={fit_sequences}",
                  f"data.max_length={max_length}", f"data.batch_size={batch_size}")
    pairs = score_job("all pairs", inputs, store, root / "pairs", "score.top_k=all", *common)
    top = score_job("top-k", inputs, store, root / "top", f"score.top_k={top_k}", *common)
    label = f"{inputs.num_queries} x {pairs.counts['documents_scored']}"
    rows = [
        SuiteRow("end to end", "attribution fit (process)", f"{fit.seconds:.1f} s", f"{fit_sequences} sequences"),
        SuiteRow("end to end", f"attribution score, all pairs {label} (process)", f"{pairs.seconds:.1f} s",
                 f"stages {pairs.timings}"),
        SuiteRow("end to end", f"attribution score, top-{top_k} (process)", f"{top.seconds:.1f} s", f"stages {top.timings}"),
    ]
    if not kronfluence_available():
        return rows + [SuiteRow("end to end", "kronfluence", "not installed", "pip install the bench extra (docs/performance.md)")]
    peer, summary = kronfluence_job(inputs, root / "kronfluence", rank, max_length, batch_size, query_batch_size,
                                    fit_sequences, top_k)
    score_seconds = summary["seconds"]["score"]
    ours = sum(pairs.timings.values())
    rows += [
        SuiteRow("end to end", "kronfluence fit (in process)", f"{summary['seconds']['fit']:.1f} s", f"{fit_sequences} sequences"),
        SuiteRow("end to end", f"kronfluence pairwise scores {label} (in process)", f"{score_seconds:.1f} s",
                 f"process {peer.seconds:.1f} s"),
        SuiteRow("end to end", "all pairs: kronfluence scores / attribution score job (in process)",
                 f"{score_seconds / ours:.2f}x", f"ours {ours:.1f} s (setup+score+merge of the run record); target >= 2"),
        SuiteRow("end to end", "all pairs: kronfluence process / attribution process",
                 f"{peer.seconds / pairs.seconds:.2f}x", "whole processes, imports and model loading included"),
        SuiteRow("end to end", f"top-{top_k}: kronfluence scores + topk / attribution score job",
                 f"{(score_seconds + summary['seconds']['top_k']) / sum(top.timings.values()):.2f}x", ""),
        SuiteRow("end to end", "Spearman, attribution vs kronfluence (mean over queries)",
                 f"{agreement(pairs.output / 'pairs', root / 'kronfluence'):.3f}", "same math, separately fitted factors"),
    ]
    return rows


def top_k_cost(root: Path, inputs: BenchmarkInputs, store: Path, ks: list[int], query_batch_size: int,
               rounds: int = 3) -> list[SuiteRow]:
    """The same run at each k, interleaved over ``rounds`` (the load of a shared machine drifts), without
    and with token scores. Besides the wall-clock ratio (median over rounds), the run records split
    each unit's time into forward+backward and the rest (reading, ranking, writing): the cost of k
    is the rest's growth over the forward+backward time, a ratio the machine's load does not move."""
    rows = []
    for tokens in (False, True):
        runs: dict[int, list[JobRun]] = {k: [] for k in ks}
        for attempt in range(rounds if not tokens else 1):
            for k in ks:
                runs[k].append(score_job(f"top-{k}", inputs, store, root / f"top-{k}-{tokens}-{attempt}",
                                         f"score.top_k={k}", "cluster.num_workers=0", f"score.query_batch_size={query_batch_size}",
                                         f"score.token_scores={str(tokens).lower()}"))
        task = {k: [json.loads(run.record.read_text())["config"]["task_seconds"] for run in runs[k]] for k in ks}
        base_rest = np.median([t["units"] - t["units_forward_backward"] for t in task[ks[0]]])
        base_fb = np.median([t["units_forward_backward"] for t in task[ks[0]]])
        for k in ks:
            wall = np.median([sum(a.timings.values()) / sum(b.timings.values()) for a, b in zip(runs[k], runs[ks[0]])])
            rest = np.median([t["units"] - t["units_forward_backward"] for t in task[k]])
            rows.append(SuiteRow(
                "top-k cost", f"top_k={k}, token_scores={str(tokens).lower()}",
                f"{1 + (rest - base_rest) / (base_fb + base_rest):.3f}x top_k={ks[0]}",
                f"outside forward+backward {rest:.1f} s (top_k={ks[0]}: {base_rest:.1f} s) of {base_fb:.1f} s f+b; "
                f"wall-clock ratio {wall:.2f} (median of {len(runs[k])})" + ("; target <= 1.05" if not tokens else "")))
    return rows


def memory(root: Path, model: Path, demo_corpus: Path, demo_queries: Path, store: Path, documents: int, queries: int,
           factor: int, shards: int) -> list[SuiteRow]:
    """Peak memory of the driver and the Ray worker at 1x and ``factor`` x the corpus and the queries."""
    sizes = {"1x": (documents, queries), f"{factor}x corpus": (documents * factor, queries),
             f"{factor}x queries": (documents, queries * factor)}
    runs = {}
    for label, (n_docs, n_queries) in sizes.items():
        inputs = benchmark_inputs(root, model, demo_corpus, demo_queries, n_docs, n_queries, shards * (n_docs // documents))
        runs[label] = score_job(label, inputs, store, root / f"memory-{label.replace(' ', '-')}", "cluster.num_workers=1",
                                "score.token_scores=false")
    rows = [SuiteRow("memory", f"{label}: {size[0]} documents, {size[1]} queries", _peak(runs[label]),
                     f"{runs[label].seconds:.1f} s") for label, size in sizes.items()]
    base = runs["1x"]
    rows.append(SuiteRow("memory", f"driver peak, {factor}x queries / 1x",
                         f"{runs[f'{factor}x queries'].driver_peak_mib / base.driver_peak_mib:.2f}x", "target <= 1.1"))
    rows.append(SuiteRow("memory", f"worker peak, {factor}x corpus / 1x",
                         f"{max(runs[f'{factor}x corpus'].worker_peak_mib) / max(base.worker_peak_mib):.2f}x", "target: flat"))
    return rows


def workers(root: Path, inputs: BenchmarkInputs, store: Path, counts: list[int]) -> list[SuiteRow]:
    """Ray workers against one, on the same corpus; start-up = the run record's setup stage."""
    runs = [score_job(f"{n} workers", inputs, store, root / f"workers-{n}", f"cluster.num_workers={n}",
                      "score.token_scores=false") for n in counts]
    rows = []
    for n, run in zip(counts, runs):
        startup = run.timings.get("setup", 0.0) / sum(run.timings.values())
        rows.append(SuiteRow("workers", f"{n} Ray worker(s), {run.counts['documents_scored']} documents",
                             f"{run.seconds:.1f} s", f"start-up {startup:.0%} of the run; {_peak(run)}"))
    rows.append(SuiteRow("workers", f"speed-up, {counts[-1]} workers / {counts[0]}", f"{runs[0].seconds / runs[-1].seconds:.2f}x",
                         "whole processes; target >= 1.7 for 2 workers"))
    return rows


def corpus_floor_seconds(model_path: Path, corpus: Path, batch_size: int, max_length: int) -> float:
    """The floor: plain forward+backward of ``log p(z)`` over every document of ``corpus``, batched as a
    score run batches them."""
    import torch

    from attribution.benchmark import plain_forward_backward
    from attribution.data.batching import batch_documents
    from attribution.models import load_model

    torch.set_num_threads(int(_environment()["OMP_NUM_THREADS"]))
    model, tokenizer = load_model(model_path)
    step = plain_forward_backward(model)
    documents = iter_documents(list_shards(corpus), on_skip=lambda skip: None)
    batches = list(batch_documents(tokenizer, documents, batch_size, max_length, on_skip=lambda skip: None))
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - started


def default_cost(root: Path, sizes: list[BenchmarkInputs], store: Path, batch_size: int, max_length: int,
                 project_to: int) -> list[SuiteRow]:
    """The jobs' default (refine.method=auto: CG) against the closed form and the floor, at each corpus size.

    A score run costs ``t(N) = a + b N``: the candidate pass grows with the N documents, the query side
    (refinement included) does not. The refinement's seconds ``R = t_default - t_closed`` should be the
    same at every N (the check of that model); the projection to ``project_to`` documents is
    ``(a_default + b M) / (f M)`` with b and f (the floor per document) from the largest corpus."""
    rows, measured = [], []
    for inputs in sizes:
        common = ("cluster.num_workers=0", "score.token_scores=false", f"data.batch_size={batch_size}",
                  f"data.max_length={max_length}")
        closed = score_job("closed form", inputs, store, root / f"closed-{inputs.documents}", "refine.method=none", *common)
        default = score_job("default", inputs, store, root / f"default-{inputs.documents}", *common)
        floor = corpus_floor_seconds(inputs.model, inputs.corpus, batch_size, max_length)
        t_closed, t_default = sum(closed.timings.values()), sum(default.timings.values())
        measured.append((inputs.documents, t_closed, t_default, floor))
        label = f"{inputs.documents} documents, {inputs.num_queries} queries"
        rows += [
            SuiteRow("default cost", f"{label}: floor (plain forward+backward of the corpus)", f"{floor:.1f} s"),
            SuiteRow("default cost", f"{label}: closed form / floor", f"{t_closed / floor:.2f}x", f"{t_closed:.1f} s"),
            SuiteRow("default cost", f"{label}: default (CG, 10 steps) / floor", f"{t_default / floor:.2f}x",
                     f"{t_default:.1f} s; refinement R = {t_default - t_closed:.1f} s"),
        ]
    (n_small, closed_small, _, _), (n_large, closed_large, default_large, floor_large) = measured[0], measured[-1]
    per_document = (closed_large - closed_small) / (n_large - n_small)
    fixed = default_large - per_document * n_large
    projected = (fixed + per_document * project_to) / (floor_large / n_large * project_to)
    rows.append(SuiteRow("default cost", f"projected to {project_to} documents: default / floor", f"{projected:.2f}x",
                         f"t = {fixed:.1f} s + {per_document * 1e3:.2f} ms x N; floor {floor_large / n_large * 1e3:.2f} ms per "
                         "document; target <= 1.3"))
    return rows


def format_suite(rows: list[SuiteRow]) -> str:
    lines = ["| section | measure | value | detail |", "|---|---|---|---|"]
    lines += [f"| {r.section} | {r.measure} | {r.value} | {r.detail} |" for r in rows]
    return "\n".join(lines)
