"""Peak memory of one refinement (one CG product) against the memory model, per setting that bounds it.

Each run refines the first COLUMNS queries of the rehearsal's query file on a sample of SEQUENCES documents
in product batches of BATCH, the first CACHED sequences' graphs kept, and prints one JSON line: the peak
resident memory above the process's level before the refinement (model and store already loaded), and the
memory model's prediction of the same (its refinement stage less the weights and the eigen-form).

    python benchmarks/refinement_memory.py ROOT COLUMNS BATCH CACHED SEQUENCES

ROOT holds the rehearsal of docs/scale.md ("One block at Llama-3.2-1B widths"): ``llama-1b-block/``,
``corpus.jsonl`` (documents of 512 tokens), ``queries.jsonl`` and the fitted store ``out/factors``. The
weights are paged in on first use, so the first run's peak also holds the parts of them that loading
left on disk (about 1.2 GiB here: the output layer and the block); differences between settings do not.
"""

from __future__ import annotations

import json
import sys

import torch

from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import load_factors
from attribution.data.batching import batch_queries
from attribution.data.queries import read_queries
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine.inverse import StageInverse
from attribution.refine.sample import sample_batches
from attribution.scale.memory_model import RunShape, model_shape, stage_bytes
from attribution.scale.peaks import StagePeaks
from attribution.scoring.stages import Stages
from attribution.settings import RefineSettings

LENGTH = 512


def main(root: str, columns: int, batch: int, cached: int, sequences: int) -> dict:
    model, tokenizer = load_model(f"{root}/llama-1b-block", False, torch.float32, "cpu")
    tracked = find_tracked_modules(model)
    shape = model_shape(model)
    factors = load_factors(f"{root}/out/factors", tracked, model_fingerprint(model), covariances=False)
    sample = sample_batches(tokenizer, f"{root}/corpus.jsonl", LENGTH + 1, batch, sequences, lambda skip: None, "sample")
    queries = read_queries(f"{root}/queries.jsonl", lambda skip: None)[:columns]
    [query_batch] = list(batch_queries(tokenizer, queries, len(queries), 129, lambda skip: None))
    refine = RefineSettings(method="cg", steps=1, batch_size=batch, max_sequences=sequences, cached_sequences=cached,
                            columns=columns)
    inverse = StageInverse("model", model, tracked, Preconditioner(factors, None, "cpu", torch.float32), refine, sample)
    stages = Stages(model, tokenizer, model, tokenizer, tracked, tracked, [inverse], "ekfac", {}, {})
    with StagePeaks(torch.device("cpu")) as peaks:
        peaks.stage("refinement")
        result = stages.query_factors(query_batch, 32)
    run = RunShape(batch=batch, sequence=LENGTH, queries=columns, query_batch=columns, refine_sequences=sequences,
                   refine_length=LENGTH, refine_batch=batch, refine_cached=cached, refine_columns=columns)
    eigen_form = sum(t.nbytes for f in factors.modules.values() for t in f.as_dict().values())
    predicted = stage_bytes(shape, run)["refinement"] - shape.weight_bytes - eigen_form
    return {"columns": columns, "batch": batch, "cached": cached, "sequences": sequences,
            "measured_gib": round((peaks.stages[0].peak_bytes - peaks.baseline) / 2**30, 2),
            "predicted_gib": round(predicted / 2**30, 2), "seconds": round(peaks.stages[0].seconds, 1),
            "products": [d["gauss_newton_products"] for d in result.diagnostics]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(value) for value in sys.argv[2:6]))))
