"""Scoring throughput as a ratio to plain forward+backward throughput of the same model and batches.

Both are timed in one process on identical batches (median over repeats after a warm-up):

- baseline: ``log p(z)`` forward and a training backward (parameter gradients included);
- scoring: :class:`CandidateScorer` layer scores of the batch against Q queries at rank r;
- fitting: one batch of the covariance pass and of the corrected-eigenvalue pass.

The preconditioner does not touch the candidate path, so the query factors here come from
gradients preconditioned by the identity: no factor fit is needed to measure throughput.
"""

from __future__ import annotations

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
from attribution.scoring.query_factors import query_factors
from attribution.scoring.stages import identity_factor_set


@dataclass(frozen=True)
class BenchmarkRow:
    """One measured step; ``queries`` is 0 for the plain and fitting rows, whose kind is ``step``."""

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
) -> list[BenchmarkRow]:
    model.to(device)
    tracked = find_tracked_modules(model)
    vocab = model.config.vocab_size
    batches = [b.to(device) for b in random_batches(vocab, num_batches, batch_size, length, seed=0)]
    baseline = median_seconds(plain_forward_backward(model), batches, warmup, repeats)
    preconditioner = Preconditioner(identity_factor_set(tracked, model_fingerprint(model)), device=device)
    parameters = sum(p.numel() for p in model.parameters())
    rows = [BenchmarkRow("plain f+b", name, parameters, 0, None, batch_size / baseline, batch_size * length / baseline, 1.0, 0, len(tracked))]
    for step, seconds in fitting_seconds(model, tracked, batches, warmup, repeats).items():
        rows.append(BenchmarkRow(step, name, parameters, 0, None, batch_size / seconds, batch_size * length / seconds,
                                 baseline / seconds, 0, len(tracked)))
    for count in query_counts:
        queries = random_batches(vocab, 1, count, length // 2, seed=1)[0].to(device)
        for rank in ranks:
            factors, _ = query_factors(model, tracked, queries, preconditioner.apply, rank)
            scorer = CandidateScorer(model, tracked, factors, expected_tokens=length)
            seconds = median_seconds(scorer.layer_scores, batches, warmup, repeats)
            rows.append(
                BenchmarkRow(
                    step="score",
                    model=name,
                    parameters=parameters,
                    queries=count,
                    rank=rank,
                    documents_per_second=batch_size / seconds,
                    tokens_per_second=batch_size * length / seconds,
                    ratio=baseline / seconds,
                    per_document_modules=sum(c == "per_document" for c in scorer.plan.values()),
                    modules=len(tracked),
                )
            )
    return rows


def fitting_seconds(model: PreTrainedModel, tracked, batches: Sequence[TokenBatch], warmup: int, repeats: int) -> dict[str, float]:
    """Per-batch time of each fitting pass (identity eigenvectors: the cost does not depend on them)."""
    device = batches[0].input_ids.device
    config = FitConfig(progress=False)
    covariances = CovarianceSums(tracked, config.dtype, device)
    eye = {m.name: torch.eye(m.d_in_augmented, device=device) for m in tracked}
    eye_out = {m.name: torch.eye(m.d_out, device=device) for m in tracked}
    eigenvalues = EigenvalueSums(tracked, eye, eye_out)
    return {
        f"fit: {label}": median_seconds(lambda batch, acc=accumulator: run_pass(model, tracked, [batch], acc, config, label),
                                        batches, warmup, repeats)
        for label, accumulator in (("covariance", covariances), ("eigenvalues", eigenvalues))
    }


def format_rows(rows: Sequence[BenchmarkRow]) -> str:
    header = f"{'step':<18}{'model':<14}{'params':>10}{'queries':>9}{'rank':>6}{'docs/s':>10}{'tokens/s':>11}{'ratio':>8}  per-doc modules"
    lines = [header, "-" * len(header)]
    for row in rows:
        label = "-" if row.queries == 0 else str(row.queries)
        rank = "-" if row.queries == 0 else ("full" if row.rank is None else str(row.rank))
        lines.append(
            f"{row.step:<18}{row.model:<14}{row.parameters / 1e6:>9.2f}M{label:>9}{rank:>6}{row.documents_per_second:>10.1f}"
            f"{row.tokens_per_second:>11.0f}{row.ratio:>8.2f}  {row.per_document_modules}/{row.modules}"
        )
    return "\n".join(lines)
