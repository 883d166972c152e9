"""What a gradient index costs in bytes, stored and while it is created, from the settings alone.

For ``M`` tracked modules, sketches of ``k x k``, ``C`` stored coordinates a module (``k^2`` when the
whole sketch is kept) of ``b`` bits, and a basis sample of ``n`` documents:

    stored, per document                      M C b / 8
    basis.safetensors                         M k^2 C 4          (with a basis)
    the sample's whole sketches, on disk      n M k^2 4          (temporary, while the basis is fitted)
    the basis fit, in memory                  8 (n k^2 + k^4)    (one module at a time, float64)
    the sample's coordinates, in memory       n M C 4            (until their shards are indexed)

Nothing but the basis sample grows with the corpus' first build, and nothing at all with its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from attribution.settings import PrefilterSettings


@dataclass(frozen=True)
class IndexFootprint:
    document_bytes: int
    basis_bytes: int
    sample_file_bytes: int
    fit_bytes: int
    kept_sample_bytes: int


def index_footprint(settings: PrefilterSettings, modules: int, corpus_documents: int | None = None) -> IndexFootprint:
    """The bytes above for ``settings`` and ``modules`` tracked modules; the sample is the smaller of
    ``sketch_basis_documents`` and ``corpus_documents`` (when known)."""
    numbers = settings.sketch_dim**2
    coordinates = settings.stored_components or numbers
    sampled = settings.sketch_basis_documents if corpus_documents is None else min(settings.sketch_basis_documents,
                                                                                  corpus_documents)
    if not settings.fits_sample:
        sampled = 0
    basis = settings.stored_components is not None
    return IndexFootprint(
        document_bytes=-(-modules * coordinates * settings.sketch_bits // 8),
        basis_bytes=modules * numbers * coordinates * 4 if basis else 0,
        sample_file_bytes=sampled * modules * numbers * 4,
        fit_bytes=8 * (sampled * numbers + numbers**2) if basis else 0,
        kept_sample_bytes=sampled * modules * coordinates * 4,
    )
