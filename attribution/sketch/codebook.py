"""The codes a gradient index stores its sketch coordinates in: float16, or 8 or 4 bits each.

With ``prefilter.sketch_bits = b`` below 16, coordinate ``j`` of every stored sketch becomes a
b-bit integer on its own range ``[lo_j, hi_j]``, fitted on the basis sample (FAISS's per-dimension
scalar quantiser):

    c_j = floor((2^b - 1) (x_j - lo_j) / (hi_j - lo_j)),  clipped to [0, 2^b - 1],
    x_j ~ lo_j + (c_j + 1/2) (hi_j - lo_j) / (2^b - 1).

Queries stay float32; a search takes their inner product with the decoded documents. Principal
coordinates (:mod:`attribution.sketch.basis`) fall off in scale from the first to the last, which
one shared range would waste bits on; a range per coordinate does not. The trained, empty index is
stored as ``codebook.faiss`` beside the shards and every shard starts as a copy of it, so all
shards decode alike and a grown index searches like one built at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from attribution.prefilter.manifest import PrefilterError
from attribution.sketch.basis import file_sha256

CODEBOOK_FILE = "codebook.faiss"
_QUANTIZERS = {16: faiss.ScalarQuantizer.QT_fp16, 8: faiss.ScalarQuantizer.QT_8bit, 4: faiss.ScalarQuantizer.QT_4bit}


def empty_index(structure: Mapping[str, Any], dim: int, bits: int) -> faiss.Index:
    """An inner-product index of ``bits``-bit codes: flat (every document scanned) or an HNSW graph."""
    if structure["index_type"] == "hnsw":
        index = faiss.IndexHNSWSQ(dim, _QUANTIZERS[bits], structure["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = structure["ef_construction"]
        return index
    return faiss.IndexScalarQuantizer(dim, _QUANTIZERS[bits], faiss.METRIC_INNER_PRODUCT)


def fit_codebook(directory: Path, structure: Mapping[str, Any], sample: np.ndarray, bits: int) -> tuple[faiss.Index, str]:
    """Fit each coordinate's range on ``sample`` (n, dim), write ``codebook.faiss`` atomically; return
    the trained empty index and the file's sha256."""
    if not len(sample):
        raise PrefilterError("prefilter.sketch_bits below 16 fits its codes on documents with a prediction target, and "
                             "the shards the index is created over have none")
    codebook = empty_index(structure, sample.shape[1], bits)
    codebook.train(np.ascontiguousarray(sample, dtype=np.float32))
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{CODEBOOK_FILE}.tmp"
    faiss.write_index(codebook, str(staging))
    staging.replace(directory / CODEBOOK_FILE)
    return codebook, file_sha256(directory / CODEBOOK_FILE)


def load_codebook(directory: Path) -> tuple[faiss.Index | None, str | None]:
    """The index's trained empty index and its file's sha256; ``(None, None)`` when it has none (the
    encoder check then names what differs from what the settings ask for)."""
    path = directory / CODEBOOK_FILE
    if not path.is_file():
        return None, None
    try:
        return faiss.read_index(str(path)), file_sha256(path)
    except RuntimeError as error:
        raise PrefilterError(f"corrupt prefilter codebook {path}: {error}") from error
