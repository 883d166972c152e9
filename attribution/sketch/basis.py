"""Each module's principal directions of the document sketches: the sketches compressed to C numbers.

A module's ``k x k`` sketches ``s(z)`` (flattened, ``k^2``) of a sample of documents ``z_1..z_n``
give the basis ``V`` (``k^2 x C``): the top C right singular vectors of ``[s(z_1); ...; s(z_n)]``,
the directions of the largest second moment ``sum_i s(z_i) s(z_i)^T`` (not centred: inner
products, not distances, are what is estimated). Documents and queries both keep ``V^T s``:

    <V^T s(q), V^T s(z)> = s(q)^T V V^T s(z),

the sketched score with the query projected onto the documents' principal subspace. That drops
the part of the query outside it, so the estimate is no longer unbiased: it trades a bias
towards the directions in which documents differ most for a much smaller spread than random
projections of the same size (docs/prefilter.md measures both). The basis is fitted once, when the
index is created, from ``n`` documents drawn uniformly from the corpus it is created over
(:func:`basis_sample`), and stored with the index; every later shard and query uses it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attribution.data.corpus import Document
from attribution.prefilter.manifest import PrefilterError

BASIS_FILE = "basis.safetensors"


def basis_sample(documents: Iterable[Document], n: int, seed: int) -> list[Document]:
    """``n`` documents drawn uniformly without replacement, in one pass over ``documents`` (reservoir
    sampling): document ``i`` (from 0) replaces a random one of those kept with probability
    ``n / (i + 1)``, so each of ``N`` documents is kept with probability ``n / N``. The first ``n`` of a
    corpus are often one source or one date; a uniform draw's directions are the corpus'."""
    draw = random.Random(seed)
    kept: list[Document] = []
    for seen, doc in enumerate(documents):
        if seen < n:
            kept.append(doc)
        elif (slot := draw.randrange(seen + 1)) < n:
            kept[slot] = doc
    return kept


def principal_directions(sketches: torch.Tensor, components: int) -> torch.Tensor:
    """``V`` (k^2, C): the top right singular vectors of ``X`` = ``sketches`` (n, k^2), in float64; at most
    ``components``, and no more than the sample spans, whose documents it then keeps exactly.

    With fewer documents than numbers (``n <= k^2``), from the Gram matrix: ``X X^T = U L U^T`` gives
    ``V = X^T U L^{-1/2}`` (an ``n x n`` eigenproblem, several times faster than the SVD); otherwise
    the eigenvectors of ``X^T X``. On the device ``sketches`` are on."""
    if not len(sketches):
        raise PrefilterError("prefilter.sketch_components needs documents with a prediction target for its basis, and "
                             "the shards the index is created over have none")
    x = sketches.double()
    if x.shape[0] > x.shape[1]:
        return torch.linalg.eigh(x.T @ x)[1].flip(1)[:, :components].contiguous()
    values, vectors = torch.linalg.eigh(x @ x.T)
    values, vectors = values.flip(0)[:components], vectors.flip(1)[:, :components]
    # Directions the sample does not span (zero eigenvalues, up to rounding) are left out.
    spanned = values > values[0] * 1e-12
    return ((x.T @ vectors[:, spanned]) / values[spanned].sqrt()).contiguous()


def save_basis(directory: Path, basis: Mapping[str, torch.Tensor]) -> str:
    """Write ``basis.safetensors`` (float32, one tensor per module) atomically; return its sha256."""
    staging = directory / f".{BASIS_FILE}.tmp"
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: matrix.float().contiguous() for name, matrix in basis.items()}, str(staging))
    staging.replace(directory / BASIS_FILE)
    return file_sha256(directory / BASIS_FILE)


def load_basis(directory: Path, modules: list[str]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The index's basis for ``modules`` and the sha256 of its file; ``(None, None)`` when it has none
    (the encoder check then names what differs from what the settings ask for)."""
    path = directory / BASIS_FILE
    if not path.is_file():
        return None, None
    basis = load_file(str(path))
    missing = [name for name in modules if name not in basis]
    if missing:
        raise PrefilterError(f"basis file {path} has no directions for module {missing[0]}: rebuild the index")
    return {name: basis[name] for name in modules}, file_sha256(path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
