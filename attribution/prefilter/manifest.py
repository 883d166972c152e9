"""The on-disk format of a prefilter index: a directory, a manifest, plain numeric files.

Layout::

    manifest.json             kind, corpus (id/text fields, every indexed shard with its sha256,
                              document and token counts), encoder and its fingerprint, totals,
                              the current generation's files, format version, times
    shards/<n>.ids.npy        document ids of indexed shard n in row order (unicode array)
    shards/<n>.counts.npz     tfidf/bm25: raw term counts, documents x hashed features (scipy CSR)
    df-<generation>.npy       tfidf/bm25: documents containing each feature, over all shards
    dense-<generation>.faiss  dense: the FAISS index; vector i is document i over the shards in order

No pickle anywhere: numpy files are read with ``allow_pickle=False``. Adding shards writes
the new files first and the manifest last, atomically, naming the files of a new
generation; a crash mid-add leaves the previous generation intact and in use.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from attribution import __version__
from attribution.errors import UserError
from attribution.runs import write_json_atomically

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class PrefilterError(UserError, ValueError):
    """An index that cannot be used: missing, corrupt, or built for another corpus or encoder."""


@dataclass
class IndexedShard:
    """One corpus file in the index; ``stem`` names its files under the index directory."""

    path: str
    fingerprint: str
    documents: int
    tokens: int
    stem: str


@dataclass
class IndexManifest:
    kind: str
    id_field: str
    text_field: str
    encoder: dict[str, Any]
    encoder_fingerprint: str
    structure: dict[str, Any]
    shards: list[IndexedShard] = field(default_factory=list)
    generation: int = 0
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    library_version: str = __version__

    @property
    def documents(self) -> int:
        return sum(shard.documents for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        # Derived, for people reading the file; ignored when loading.
        payload["counts"] = {"shards": len(self.shards), "documents": self.documents, "tokens": self.tokens}
        return payload


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(directory: Path) -> IndexManifest:
    """The manifest of the index at ``directory``; PrefilterError naming the path if absent or unreadable."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise PrefilterError(f"no prefilter index at {directory}: {path} does not exist (build it with jobs.build_index)")
    try:
        payload = json.loads(path.read_text())
        payload.pop("counts", None)
        if payload.get("format_version") != FORMAT_VERSION:
            raise PrefilterError(
                f"prefilter index {directory} has format_version {payload.get('format_version')!r}; "
                f"this library reads {FORMAT_VERSION}: rebuild it"
            )
        payload["shards"] = [IndexedShard(**shard) for shard in payload["shards"]]
        return IndexManifest(**payload)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise PrefilterError(f"corrupt prefilter index manifest {path}: {error}") from error


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    manifest.updated = _now()
    write_json_atomically(directory / MANIFEST_NAME, manifest.to_json())


def shard_fingerprint(path: Path) -> str:
    """sha256 of the file's bytes: identifies a shard's content wherever the file lives."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def json_fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def select_shards(directory: Path, manifest: IndexManifest, corpus: Sequence[Path]) -> dict[int, str]:
    """Position in the index -> current path, for each corpus shard.

    Shards are matched by content, so a moved corpus still matches. A corpus shard the index
    lacks (or whose content changed) means the index was built for another corpus: an error.
    Indexed shards outside ``corpus`` are simply not searched (a sweep scores new shards only).
    """
    positions = {shard.fingerprint: position for position, shard in enumerate(manifest.shards)}
    indexed_paths = {Path(shard.path).resolve() for shard in manifest.shards}
    selected = {}
    for path in corpus:
        position = positions.get(shard_fingerprint(path))
        if position is None:
            why = "its content changed since it was indexed" if path.resolve() in indexed_paths else "it is not in the index"
            raise PrefilterError(
                f"prefilter index {directory} was built for another corpus: shard {path} does not match ({why}); "
                f"add it with jobs.build_index prefilter.path={directory} data.path=..."
            )
        selected[position] = str(path)
    return dict(sorted(selected.items()))


def save_ids(path: Path, ids: Sequence[str]) -> None:
    np.save(path, np.asarray(ids, dtype=str) if ids else np.empty(0, dtype="<U1"), allow_pickle=False)


def load_array(path: Path) -> np.ndarray:
    """A .npy file written by this module; PrefilterError naming the path if missing or corrupt."""
    if not path.is_file():
        raise PrefilterError(f"prefilter index file {path} is missing")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise PrefilterError(f"corrupt prefilter index file {path}: {error}") from error


def load_sparse(path: Path) -> sp.csr_matrix:
    """A scipy .npz matrix; PrefilterError naming the path if missing or corrupt."""
    if not path.is_file():
        raise PrefilterError(f"prefilter index file {path} is missing")
    try:
        return sp.load_npz(path).tocsr()
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise PrefilterError(f"corrupt prefilter index file {path}: {error}") from error


def expect_length(path: Path, actual: int, expected: int, what: str) -> None:
    """Files that disagree with the manifest are corrupt (or from an interrupted write)."""
    if actual != expected:
        raise PrefilterError(f"corrupt prefilter index file {path}: {actual} {what}, the manifest says {expected}")
