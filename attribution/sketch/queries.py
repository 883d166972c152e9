"""The query side of the gradient prefilter: each query's preconditioned gradient, sketched.

The query's gradient goes through exactly the preconditioning of the score run (the closed
form, refinement, multi-stage), is compressed to ``score.rank``, and is sketched with the
index's projections, so that ``<sketch(q), sketch(z)>`` estimates the score the candidate
pass will compute (:mod:`attribution.sketch.projection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attribution.data.batching import batch_queries
from attribution.data.queries import Query
from attribution.prefilter.manifest import IndexManifest
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.stages import build_stages
from attribution.settings import resolve_device
from attribution.sketch.basis import load_basis
from attribution.sketch.codebook import load_codebook
from attribution.sketch.index import QuerySketches, check_encoder, encoder_description, to_numpy, whitening_of
from attribution.sketch.sketcher import Sketcher


def query_sketcher(inputs: ScoreInputs, directory: Path, manifest: IndexManifest, output_dir: Path) -> QuerySketches:
    """Load the score run's stages once; return the function that sketches a list of queries."""
    stages = build_stages(inputs.model, inputs.factors, inputs.finetune, inputs.refine, output_dir,
                          resolve_device(inputs.model.device))
    store = Path(inputs.factors.path) if inputs.factors.path is not None else output_dir / "factors"
    fingerprint = stages.fingerprints["model"]
    basis, basis_sha256 = (None, None) if inputs.prefilter.stored_components is None else \
        load_basis(directory, [module.name for module in stages.tracked])
    codebook_sha256 = None if inputs.prefilter.sketch_bits == 16 else load_codebook(directory)[1]
    check_encoder(directory, manifest, encoder_description(fingerprint, stages.tracked, inputs.prefilter, inputs.data, store,
                                                           basis_sha256, codebook_sha256))
    whitening = whitening_of(store, stages.tracked, fingerprint) if inputs.prefilter.sketch_whiten else None
    sketcher = Sketcher(stages.candidate_model, stages.tracked, inputs.prefilter.sketch_seed, inputs.prefilter.sketch_dim,
                        whitening=whitening)
    if basis is not None:
        sketcher = sketcher.with_basis(basis)

    def sketch(queries: Sequence[Query]) -> dict[str, np.ndarray]:
        sketches: dict[str, np.ndarray] = {}
        # Skipped queries (too long, non-finite) have no sketch; the score run records why.
        for batch in batch_queries(stages.query_tokenizer, queries, inputs.score.query_batch_size,
                                   inputs.data.max_length, on_skip=lambda skip: None):
            prepared = stages.query_factors(batch, inputs.score.rank)
            if prepared.factors.query_ids:
                sketches.update(zip(prepared.factors.query_ids, to_numpy(sketcher.queries(prepared.factors))))
        return sketches

    return sketch
