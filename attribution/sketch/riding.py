"""Gradient sketches kept by a score run that passes over every document anyway (``score.keep_sketches``).

The scoring pass already captures each tracked module's inputs ``a_t`` and output gradients
``ds_t`` for every document; the sketch ``sum_t (P_out ds_t)(P_in a_t)^T`` of the same gradient
costs ``T k (d_out + d_in + k)`` more per module and sequence, and no second forward or backward.

- Before the pass, the driver creates the index when there is none (its basis and codes fitted
  on a sample of the run's shards, as ``jobs.build_index`` does) or checks the one there
  (:func:`prepare_index`).
- A unit of the run's first pass over a shard the index lacks sketches the shard's scored
  documents and writes its files under a name given by the shard's content
  (:class:`KeptSketches`), before the unit's completion marker; a rerun finds them.
- When the run ends, the driver adds every such shard to the manifest (:func:`add_kept_shards`);
  a shard whose unit failed is named, not added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from transformers import PreTrainedModel

from attribution.curvature.capture import GradientCallback
from attribution.data.corpus import Skip, SkipHandler
from attribution.models import TrackedModule
from attribution.prefilter.index import open_or_create
from attribution.prefilter.manifest import (
    MANIFEST_NAME,
    IndexedShard,
    IndexManifest,
    load_array,
    read_manifest,
    shard_fingerprint,
    write_manifest,
)
from attribution.scoring.inputs import ScoreInputs
from attribution.settings import PrefilterSettings
from attribution.sketch.index import DocumentSketcher, index_sketcher, shard_index, write_shard_files

NON_FINITE_SKETCH = "non-finite gradient sketch: scored, but not added to the gradient index"


def kept_index_path(inputs: ScoreInputs, output_dir: Path) -> Path:
    """The gradient index a run keeps its sketches in: ``prefilter.path``, else ``<output_dir>/prefilter/gradient``."""
    return inputs.prefilter.index_path(output_dir, "gradient")


def gradient_settings(inputs: ScoreInputs) -> PrefilterSettings:
    """The run's ``prefilter.sketch_*`` settings as those of a gradient index (the run's own kind is none)."""
    return replace(inputs.prefilter, kind="gradient")


def kept_stem(fingerprint: str) -> str:
    """A kept shard's files are named by the shard's content, so a unit's retry or a rerun finds them."""
    return f"shards/kept-{fingerprint[:24]}"


def prepare_index(inputs: ScoreInputs, output_dir: Path, shards: Sequence[Path]) -> None:
    """Create the run's gradient index with no shards (basis and codes from a sample of ``shards``), or
    check that the one there was built for this model, store and ``prefilter.sketch_*`` settings.

    The model is loaded here, in the driver, and released before the run's workers load theirs."""
    directory = kept_index_path(inputs, output_dir)
    sketcher = DocumentSketcher(inputs.model, inputs.data, gradient_settings(inputs), inputs.factors.store_path(output_dir))
    manifest = open_or_create(directory, gradient_settings(inputs), inputs.data, shards, sketcher)
    if not (directory / MANIFEST_NAME).exists():
        write_manifest(directory, manifest)


@dataclass(frozen=True)
class KeptShards:
    """What a run added to its gradient index, and the shards it could not (their units failed)."""

    directory: Path
    shards: int
    documents: int
    missing: list[str]

    def note(self) -> str:
        line = f"gradient sketches of {self.shards} shard(s), {self.documents} documents, kept in {self.directory}"
        if self.missing:
            line += f"; not kept, their units having failed: {', '.join(self.missing)}"
        return line


def add_kept_shards(inputs: ScoreInputs, output_dir: Path, shards: Sequence[Path]) -> KeptShards:
    """Add every shard of the run whose sketches a unit wrote to the index's manifest."""
    directory = kept_index_path(inputs, output_dir)
    manifest = read_manifest(directory)
    indexed = {shard.fingerprint for shard in manifest.shards}
    added: list[IndexedShard] = []
    missing = []
    for path in shards:
        fingerprint = shard_fingerprint(path)
        if fingerprint in indexed:
            continue
        stem = kept_stem(fingerprint)
        if not (directory / f"{stem}.ids.npy").is_file():
            missing.append(str(path))
            continue
        added.append(IndexedShard(str(path), fingerprint, len(load_array(directory / f"{stem}.ids.npy")), 0, stem))
        indexed.add(fingerprint)
    if added:
        manifest.shards += added
        manifest.generation += 1
        write_manifest(directory, manifest)
    return KeptShards(directory, len(added), sum(shard.documents for shard in added), missing)


class KeptSketches:
    """A worker's side: the index's sketcher on the scoring model, and the shards it still lacks."""

    def __init__(self, model: PreTrainedModel, tracked: Sequence[TrackedModule], fingerprint: str, inputs: ScoreInputs,
                 output_dir: Path) -> None:
        self.directory = kept_index_path(inputs, output_dir)
        manifest: IndexManifest = read_manifest(self.directory)
        self.sketcher, self.codebook = index_sketcher(model, tracked, fingerprint, gradient_settings(inputs), inputs.data,
                                                      inputs.factors.store_path(output_dir), self.directory, manifest)
        self.structure = manifest.structure
        self.indexed = {shard.fingerprint for shard in manifest.shards}

    def shard(self, path: Path) -> ShardSketches | None:
        """The collector of ``path``'s sketches; None when the index has them or a unit already wrote them."""
        fingerprint = shard_fingerprint(path)
        stem = kept_stem(fingerprint)
        if fingerprint in self.indexed or (self.directory / f"{stem}.ids.npy").is_file():
            return None
        return ShardSketches(self, stem, path)


class ShardSketches:
    """One shard's sketches, added batch by batch from the scoring pass's captures to the shard's
    FAISS index: memory holds the shard's stored codes and one batch's whole sketches."""

    def __init__(self, kept: KeptSketches, stem: str, shard: Path) -> None:
        self.kept = kept
        self.stem = stem
        self.shard = str(shard)
        self.ids: list[str] = []
        self.index: faiss.Index = shard_index(kept.codebook, kept.structure, kept.sketcher.dim)
        self._batch: torch.Tensor | None = None

    def capture(self, batch_size: int, device: torch.device) -> GradientCallback:
        """The hook that sketches each module of the next batch."""
        self._batch, hook = self.kept.sketcher.capture(batch_size, device)
        return hook

    def keep(self, positions: np.ndarray, ids: Sequence[str], rows: np.ndarray, on_skip: SkipHandler) -> None:
        """Keep the captured batch's sketches of the documents at ``positions`` (those scored)."""
        assert self._batch is not None, "capture() comes before keep()"
        vectors = self.kept.sketcher.compress(self._batch[torch.as_tensor(positions, device=self._batch.device)])
        vectors = vectors.detach().float().cpu().numpy()
        finite = np.isfinite(vectors).all(axis=1)
        for position in np.flatnonzero(~finite):
            on_skip(Skip(ids[position], self.shard, int(rows[position]), NON_FINITE_SKETCH))
        self.ids += [doc_id for doc_id, ok in zip(ids, finite) if ok]
        self.index.add(np.ascontiguousarray(vectors[finite]))
        self._batch = None

    def write(self) -> None:
        """The shard's FAISS file and ids, under the index's ``shards/``."""
        write_shard_files(self.kept.directory, self.stem, self.index, self.ids)
