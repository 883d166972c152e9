"""What the gradient prefilter's sketch pass costs over a plain forward+backward pass at real widths.

A Llama built from a config at a real model's widths (BLOCKS blocks; a 1,024-token vocabulary, so the
output layer, which the sketch does not touch, adds almost nothing to the floor and the ratio is the
blocks' own, an upper bound for the whole model), one sequence of LENGTH random tokens per batch. For
each sketch size k in DIMS (k x k per module; with COMPONENTS > 0 also compressed to that many principal
coordinates by a random orthonormal basis, which costs what a fitted one does) it prints one JSON line:
seconds per pass of the plain forward+backward (parameter gradients included) and of the sketch pass,
their ratio, the multiply-adds per token of the projections against those of the tracked modules'
forward, and what ``score.keep_sketches`` adds to a scoring pass: the candidate pass against 64
random queries of rank 32 (dense factors within the default ``score.dense_factors_mib``) with the
sketch hook on its capture (and the coordinates), over the same pass without, the two timed in
turn. Every pass is timed REPEATS times after one warm-up, the median kept; torch uses THREADS
threads.

    python benchmarks/sketch_widths.py WIDTHS BLOCKS LENGTH REPEATS THREADS COMPONENTS DIMS...

WIDTHS is ``llama-3.2-1b`` (2048 / 8192 / 32 heads / 8 KV heads) or ``llama-3.1-8b`` (4096 / 14336 / 32 / 8),
e.g. ``python benchmarks/sketch_widths.py llama-3.2-1b 2 512 3 1 256 16 64`` (docs/prefilter.md).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attribution.benchmark import median_seconds, plain_forward_backward, random_batches
from attribution.data.batching import TokenBatch
from attribution.models import TrackedModule, find_tracked_modules
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.query_factors import ModuleQueryFactors, QueryFactors
from attribution.settings import ScoreSettings
from attribution.sketch.sketcher import Sketcher

WIDTHS = {"llama-3.2-1b": (2048, 8192, 32, 8), "llama-3.1-8b": (4096, 14336, 32, 8)}
VOCABULARY = 1024
# The scoring pass keep_sketches rides on: the sketch benchmark's 64 queries at rank 32.
QUERIES, RANK = 64, 32


def random_basis(sketcher: Sketcher, components: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    side = sketcher.k * sketcher.k
    return {module.name: torch.linalg.qr(torch.randn(side, components, generator=generator))[0] for module in sketcher.tracked}


def random_factors(tracked: list[TrackedModule]) -> QueryFactors:
    """Rank-RANK factors of QUERIES queries per module: what the candidate pass contracts documents with."""
    generator = torch.Generator().manual_seed(1)
    return QueryFactors([f"q{i}" for i in range(QUERIES)], {
        module.name: ModuleQueryFactors(torch.randn(QUERIES, module.d_out, RANK, generator=generator),
                                        torch.randn(QUERIES, module.d_in_augmented, RANK, generator=generator))
        for module in tracked})


def main(widths: str, blocks: int, length: int, repeats: int, threads: int, components: int, dims: list[int]) -> None:
    torch.set_num_threads(threads)
    hidden, intermediate, heads, kv_heads = WIDTHS[widths]
    config = LlamaConfig(vocab_size=VOCABULARY, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=length)
    model = LlamaForCausalLM(config).float()
    tracked = find_tracked_modules(model)
    batches = random_batches(VOCABULARY, 1, 1, length, seed=1)
    floor = median_seconds(plain_forward_backward(model), batches, 1, repeats)
    module_forward = sum(module.d_out * module.d_in_augmented for module in tracked)
    scorer = CandidateScorer(model, tracked, random_factors(tracked), length, dense_budget_mib=ScoreSettings().dense_factors_mib)
    for k in dims:
        sketcher = Sketcher(model, tracked, 0, k)
        if 0 < components < k * k:
            sketcher = sketcher.with_basis(random_basis(sketcher, components))

        def sketch(batch: TokenBatch) -> None:
            model.zero_grad(set_to_none=True)
            sketcher.documents(batch)

        seconds = median_seconds(sketch, batches, 1, repeats)

        def keeping(batch: TokenBatch) -> None:
            sketches, hook = sketcher.capture(len(batch.ids), batch.input_ids.device)
            scorer.layer_scores(batch, hook)
            sketcher.compress(sketches)

        # Interleaved, so that what else the machine does weighs on both alike.
        paired = [(median_seconds(scorer.layer_scores, batches, int(r == 0), 1), median_seconds(keeping, batches, int(r == 0), 1))
                  for r in range(repeats)]
        scoring, kept = (statistics.median(times) for times in zip(*paired))
        projections = sum(k * (module.d_out + module.d_in_augmented + k) for module in tracked)
        print(json.dumps({"widths": widths, "blocks": blocks, "length": length, "k": k,
                          "components": components if 0 < components < k * k else None, "threads": threads,
                          "floor_seconds": round(floor, 3), "sketch_seconds": round(seconds, 3),
                          "sketch_over_floor": round(seconds / floor, 3),
                          "projection_over_module_forward": round(projections / module_forward, 4),
                          "scoring_seconds": round(scoring, 3), "keeping_sketches_seconds": round(kept, 3),
                          "keeping_over_scoring": round(kept / scoring, 3)}), flush=True)


if __name__ == "__main__":
    widths, blocks, length, repeats, threads, components, *dims = sys.argv[1:]
    main(widths, int(blocks), int(length), int(repeats), int(threads), int(components), [int(k) for k in dims])
