"""Scoring throughput as a ratio to plain forward+backward throughput of the same model and batches.

Both are timed in one process on identical batches (median over repeats after a warm-up):

- baseline: ``log p(z)`` forward and a training backward (parameter gradients included);
- scoring: :class:`CandidateScorer` layer scores of the batch against Q queries at rank r;
- fitting: one batch of the covariance pass and of the corrected-eigenvalue pass.

The preconditioner does not touch the candidate path, so the query factors here come from
gradients preconditioned by the identity: no factor fit is needed to measure throughput.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedModel

from attribution.curvature.accumulators import CovarianceSums, EigenvalueSums
from attribution.curvature.fit import FitConfig, run_pass
from attribution.curvature.precondition import Preconditioner
from attribution.data.batching import TokenBatch, sequence_log_prob
from attribution.models import find_tracked_modules, model_fingerprint
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import QueryFactors, concatenate, query_factors
from attribution.scoring.stages import identity_factor_set

# Query gradients are formed this many queries at a time (float64, Q x parameters each).
QUERY_CHUNK = 64


@dataclass(frozen=True)
class BenchmarkRow:
    """One measured step; ``queries`` is 0 for the plain and fitting rows, whose kind is ``step``.

    ``peak_memory_mib``: the most device memory allocated during the step (CUDA only, else None).
    """

    step: str
    model: str
    parameters: int
    queries: int
    rank: int | None
    documents_per_second: float
    tokens_per_second: float
    ratio: float
    per_document_modules: int
    modules: int
    dtype: str = "float32"
    peak_memory_mib: float | None = None


def gpt_neox_from_config(**config: int) -> PreTrainedModel:
    """A randomly initialised GPT-NeoX (e.g. ~10M parameters) built from a config dict."""
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(**config)).eval()


def random_batches(vocab_size: int, count: int, batch_size: int, length: int, seed: int) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        target_mask = attention_mask.bool().clone()
        target_mask[:, 0] = False
        ids = [f"{seed}-{index}-{row}" for row in range(batch_size)]
        batches.append(TokenBatch(ids, ["random"] * batch_size, input_ids, attention_mask, target_mask, [False] * batch_size))
    return batches


def median_seconds(step: Callable[[TokenBatch], object], batches: Sequence[TokenBatch], warmup: int, repeats: int) -> float:
    """Median wall time of one pass over ``batches``, per batch."""
    for batch in batches[:warmup]:
        step(batch)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        timings.append((time.perf_counter() - start) / len(batches))
    return statistics.median(timings)


def plain_forward_backward(model: PreTrainedModel) -> Callable[[TokenBatch], None]:
    def step(batch: TokenBatch) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        (-sequence_log_prob(logits, batch).sum()).backward()

    return step


class PeakMemory:
    """The most CUDA memory allocated inside the block (None on other devices)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20


def benchmark_query_factors(model: PreTrainedModel, tracked, queries: TokenBatch, precondition, rank: int | None,
                            chunk: int = QUERY_CHUNK) -> QueryFactors:
    """The queries' factors, ``chunk`` at a time (their float64 gradients would not fit at once)."""
    parts = []
    for start in range(0, len(queries.ids), chunk):
        rows = slice(start, start + chunk)
        part = dataclasses.replace(queries, ids=queries.ids[rows], shards=queries.shards[rows], input_ids=queries.input_ids[rows],
                                    attention_mask=queries.attention_mask[rows], target_mask=queries.target_mask[rows],
                                    truncated=queries.truncated[rows])
        parts.append(query_factors(model, tracked, part, precondition, rank)[0])
    return concatenate(parts)


def benchmark_model(
    name: str,
    model: PreTrainedModel,
    query_counts: Sequence[int],
    ranks: Sequence[int | None],
    batch_size: int,
    length: int,
    num_batches: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    dense_factors_mib: float | None = 2048,
    fitting: bool = True,
    query_chunk: int = QUERY_CHUNK,
) -> list[BenchmarkRow]:
    """Plain forward+backward, the fitting passes and scoring at each (Q, rank), on the same batches.

    ``dense_factors_mib`` is the scorer's budget for dense query factors (``score.dense_factors_mib``).
    """
    model.to(device, dtype)
    tracked = find_tracked_modules(model)
    vocab = model.config.vocab_size
    batches = [b.to(device) for b in random_batches(vocab, num_batches, batch_size, length, seed=0)]
    label = str(dtype).removeprefix("torch.")
    parameters = sum(p.numel() for p in model.parameters())

    def row(step: str, seconds: float, baseline: float, peak: PeakMemory, queries: int = 0, rank: int | None = None,
            per_document: int = 0) -> BenchmarkRow:
        return BenchmarkRow(step, name, parameters, queries, rank, batch_size / seconds, batch_size * length / seconds,
                            baseline / seconds, per_document, len(tracked), label, peak.mib)

    with PeakMemory(device) as peak:
        baseline = median_seconds(plain_forward_backward(model), batches, warmup, repeats)
    rows = [row("plain f+b", baseline, baseline, peak)]
    model.zero_grad(set_to_none=True)
    if fitting:
        for step, (seconds, peak) in fitting_seconds(model, tracked, batches, warmup, repeats).items():
            rows.append(row(step, seconds, baseline, peak))
    preconditioner = Preconditioner(identity_factor_set(tracked, model_fingerprint(model)), device=device)
    for count in query_counts:
        queries = random_batches(vocab, 1, count, length // 2, seed=1)[0].to(device)
        for rank in ranks:
            factors = benchmark_query_factors(model, tracked, queries, preconditioner.apply, rank, query_chunk)
            with PeakMemory(device) as peak:
                scorer = CandidateScorer(model, tracked, factors, expected_tokens=length, dtype=dtype,
                                         dense_budget_mib=dense_factors_mib)
                seconds = median_seconds(scorer.layer_scores, batches, warmup, repeats)
            rows.append(row("score", seconds, baseline, peak, count, rank,
                            sum(c == "per_document" for c in scorer.plan.values())))
            del scorer, factors
    return rows


def fitting_seconds(model: PreTrainedModel, tracked, batches: Sequence[TokenBatch], warmup: int,
                    repeats: int) -> dict[str, tuple[float, PeakMemory]]:
    """Per-batch time (and peak memory) of each fitting pass (identity eigenvectors: the cost does not depend on them)."""
    device = batches[0].input_ids.device
    config = FitConfig(progress=False)
    covariances = CovarianceSums(tracked, config.dtype, device)
    eye = {m.name: torch.eye(m.d_in_augmented, device=device) for m in tracked}
    eye_out = {m.name: torch.eye(m.d_out, device=device) for m in tracked}
    eigenvalues = EigenvalueSums(tracked, eye, eye_out)
    result = {}
    for label, accumulator in (("covariance", covariances), ("eigenvalues", eigenvalues)):
        with PeakMemory(device) as peak:
            seconds = median_seconds(lambda batch, acc=accumulator: run_pass(model, tracked, [batch], acc, config, label),
                                     batches, warmup, repeats)
        result[f"fit: {label}"] = (seconds, peak)
    return result


def format_rows(rows: Sequence[BenchmarkRow]) -> str:
    header = (f"{'step':<18}{'model':<14}{'dtype':<10}{'params':>10}{'queries':>9}{'rank':>6}{'docs/s':>10}{'tokens/s':>11}"
              f"{'ratio':>8}{'peak MiB':>10}  per-doc modules")
    lines = [header, "-" * len(header)]
    for row in rows:
        label = "-" if row.queries == 0 else str(row.queries)
        rank = "-" if row.queries == 0 else ("full" if row.rank is None else str(row.rank))
        peak = "-" if row.peak_memory_mib is None else f"{row.peak_memory_mib:.0f}"
        lines.append(
            f"{row.step:<18}{row.model:<14}{row.dtype:<10}{row.parameters / 1e6:>9.2f}M{label:>9}{rank:>6}"
            f"{row.documents_per_second:>10.1f}{row.tokens_per_second:>11.0f}{row.ratio:>8.2f}{peak:>10}  "
            f"{row.per_document_modules}/{row.modules}"
        )
    return "\n".join(lines)
