"""The candidate pass against the plain forward+backward of the same batch, at Pythia-160M widths, Q = 64, r = 32,
2 x 2,048 tokens, with scoring's plan of contractions and with the low-rank contraction wherever no dense factors
fit (the plan before the document_low_rank contraction existed), in one process; the scores must agree.

    OMP_NUM_THREADS=1 python benchmarks/candidate_contractions.py MODEL_DIR

MODEL_DIR: the Pythia-160M rehearsal model, e.g. ``outputs/scale/rehearsal/pythia-160m`` after
``python -m jobs.scale scale.models=[pythia-160m]``. Random query factors (the cost does not depend on them).
"""

from __future__ import annotations

import sys
import time

import torch

from attribution.benchmark import plain_forward_backward
from attribution.models import find_tracked_modules, load_model
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.contraction import ModuleContraction
from attribution.scoring.query_factors import ModuleQueryFactors, QueryFactors
from tests.tiny import make_batch

model, _ = load_model(sys.argv[1])
tracked = find_tracked_modules(model)
g = torch.Generator().manual_seed(0)
Q, r = 64, 32
factors = QueryFactors([f"q{i}" for i in range(Q)], {m.name: ModuleQueryFactors(torch.randn(Q, m.d_out, r, generator=g) / 30,
                        torch.randn(Q, m.d_in_augmented, r, generator=g) / 30) for m in tracked})
batch = make_batch(torch.randint(1, 50000, (2, 2048), generator=g).tolist())
step = plain_forward_backward(model)


def timed(fn, repeats=2):
    fn(batch)
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best.append(time.perf_counter() - start)
    return min(best)

BUDGET_MIB = 2048  # score.dense_factors_mib's default
new = CandidateScorer(model, tracked, factors, 2048, torch.float32, BUDGET_MIB)
old = CandidateScorer(model, tracked, factors, 2048, torch.float32, BUDGET_MIB)
old.contractions = {name: ModuleContraction(factors.modules[name], "low_rank") if c.contraction == "document_low_rank" else c
                    for name, c in old.contractions.items()}
for name, scorer in (("plan", new), ("low-rank plan", old)):
    counts = {kind: list(scorer.plan.values()).count(kind) for kind in sorted(set(scorer.plan.values()))}
    print(f"{name}: {counts}")
floor = timed(step)
t_new = timed(new.layer_scores)
t_old = timed(old.layer_scores)
print(f"plain forward+backward {floor:.1f} s; low-rank plan {t_old:.1f} s (throughput ratio {floor / t_old:.2f}); "
      f"plan {t_new:.1f} s (ratio {floor / t_new:.2f})")
torch.testing.assert_close(new.layer_scores(batch), old.layer_scores(batch), rtol=1e-3, atol=1e-3)
print("the two plans give the same scores")
