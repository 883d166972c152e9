"""The query side of the gradient prefilter: each query's preconditioned gradient, sketched.

The query's gradient goes through exactly the preconditioning of the score run (the closed
form, refinement, multi-stage), is compressed to ``score.rank``, and is sketched with the
index's projections, so that ``<sketch(q), sketch(z)>`` estimates the score the candidate
pass will compute (:mod:`attribution.sketch.projection`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attribution.data.batching import batch_queries
from attribution.data.queries import Query
from attribution.prefilter.manifest import IndexManifest
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.query_files import save_query_batch
from attribution.scoring.stages import build_stages
from attribution.settings import resolve_device
from attribution.sketch.index import QuerySketches, index_sketcher, to_numpy


def query_sketcher(inputs: ScoreInputs, directory: Path, manifest: IndexManifest, output_dir: Path,
                   staged: Path | None = None) -> QuerySketches:
    """Load the score run's stages once; return the function that sketches a list of queries. With
    ``staged``, each batch's factors are also written there, as ``<batch>.safetensors``, for the run to use."""
    stages = build_stages(inputs.model, inputs.factors, inputs.finetune, inputs.refine, output_dir,
                          resolve_device(inputs.model.device))
    store = inputs.factors.store_path(output_dir)
    sketcher, _ = index_sketcher(stages.candidate_model, stages.tracked, stages.fingerprints["model"], inputs.prefilter,
                                 inputs.data, store, directory, manifest)

    def sketch(queries: Sequence[Query]) -> dict[str, np.ndarray]:
        sketches: dict[str, np.ndarray] = {}
        # Skipped queries (too long, non-finite) have no sketch; the score run records why.
        batches = batch_queries(stages.query_tokenizer, queries, inputs.score.query_batch_size, inputs.data.max_length,
                                on_skip=lambda skip: None)
        for index, batch in enumerate(batches):
            started = time.perf_counter()
            prepared = stages.query_factors(batch, inputs.score.rank)
            if staged is not None:
                save_query_batch(staged / f"{index}.safetensors", prepared, batch.ids, time.perf_counter() - started)
            if prepared.factors.query_ids:
                sketches.update(zip(prepared.factors.query_ids, to_numpy(sketcher.queries(prepared.factors))))
        return sketches

    return sketch
