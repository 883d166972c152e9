"""Build, extend and open prefilter indexes of any kind.

``update_index`` creates the index at a directory or adds the corpus shards it lacks (the
nightly sweep); ``open_index`` checks it against the settings and the corpus to be searched
and returns a retriever: for the text kinds one with ``top_m(texts, m) -> [[Hit(doc_id, score,
shard), ...] per text]``; for ``gradient`` a :class:`~attribution.sketch.index.SketchIndex`,
searched with the queries' gradient sketches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from attribution.data.corpus import Document, IdRegistry, SkipHandler, iter_documents, list_shards
from attribution.prefilter import dense, sparse
from attribution.prefilter.manifest import (
    MANIFEST_NAME,
    IndexManifest,
    PrefilterError,
    json_fingerprint,
    read_manifest,
    select_shards,
    shard_fingerprint,
    write_manifest,
)
from attribution.prefilter.ranking import Hit
from attribution.runs import RunRecord
from attribution.settings import DataSettings, ModelSettings, PrefilterSettings, SettingsError
from attribution.sketch.footprint import index_footprint
from attribution.sketch.index import DocumentSketcher, SketchBuilder, SketchIndex, sketch_structure


class Retriever(Protocol):
    manifest: IndexManifest
    # Position in manifest.shards -> current path of each shard searched.
    selection: Mapping[int, str]

    def top_m(self, texts: Sequence[str], m: int) -> list[list[Hit]]: ...


@dataclass
class UpdateSummary:
    path: Path
    kind: str
    shards_added: int
    documents_added: int
    shards: int
    documents: int
    seconds: float
    already_indexed: list[str] = field(default_factory=list)
    # gradient: the bytes each document's sketch is stored in.
    document_bytes: int | None = None

    def line(self) -> str:
        rate = self.documents_added / self.seconds if self.seconds else 0.0
        size = f", {self.document_bytes} bytes each" if self.document_bytes is not None else ""
        return (
            f"{self.kind} index {self.path}: added {self.shards_added} shard(s), {self.documents_added} documents "
            f"in {self.seconds:.1f} s ({rate:.0f} documents/s); now {self.shards} shard(s), {self.documents} documents{size}"
        )


def _require_kind(settings: PrefilterSettings) -> str:
    if settings.kind == "none":
        raise SettingsError("prefilter.kind=none has no index: choose tfidf, bm25, dense or gradient")
    return settings.kind


def encoder_identity(settings: PrefilterSettings, sketcher: DocumentSketcher | None = None) -> tuple[dict[str, Any], str]:
    """How a document becomes index entries, and its fingerprint (dense: a hash of the model's files;
    gradient: of the scored model's weights and the projections)."""
    if sketcher is not None:
        return sketcher.description, sketcher.fingerprint
    if _require_kind(settings) == "dense":
        return dense.encoder_description(settings), dense.model_fingerprint(dense.model_directory(settings.model))
    description = sparse.encoder_description(settings)
    return description, json_fingerprint(description)


def _structure(settings: PrefilterSettings) -> dict[str, Any]:
    if settings.kind == "gradient":
        return sketch_structure(settings)
    return dense.structure_description(settings) if settings.kind == "dense" else {}


def _check_encoder(directory: Path, manifest: IndexManifest, settings: PrefilterSettings,
                   sketcher: DocumentSketcher | None) -> None:
    if manifest.kind != settings.kind:
        raise PrefilterError(f"prefilter index {directory} is a {manifest.kind} index, but prefilter.kind={settings.kind}")
    description, fingerprint = encoder_identity(settings, sketcher)
    if fingerprint != manifest.encoder_fingerprint:
        raise PrefilterError(
            f"prefilter index {directory} was built with another encoder: {manifest.encoder} "
            f"(fingerprint {manifest.encoder_fingerprint}); the settings ask for {description} (fingerprint {fingerprint})"
        )


def update_index(
    directory: str | Path,
    settings: PrefilterSettings,
    data: DataSettings,
    shards: Sequence[Path],
    on_skip: SkipHandler,
    model: ModelSettings | None = None,
    store: Path | None = None,
) -> UpdateSummary:
    """Create the index at ``directory`` over ``shards``, or add those it does not hold yet.

    Shards are identified by content (sha256), so one already indexed is never read again;
    the index must have been built with the same kind, encoder, FAISS structure and fields.
    ``model`` is the scored model, which the ``gradient`` kind sketches documents with, whitened
    by the factor store at ``store``.
    """
    _require_kind(settings)
    started = time.perf_counter()
    directory = Path(directory)
    sketcher = DocumentSketcher(model or ModelSettings(), data, settings, store) if settings.kind == "gradient" else None
    manifest = open_or_create(directory, settings, data, shards, sketcher)
    indexed = {shard.fingerprint for shard in manifest.shards}
    new = [(path, fingerprint) for path in shards if (fingerprint := shard_fingerprint(path)) not in indexed]
    already = [str(path) for path in shards if path not in dict(new)]
    documents_before = manifest.documents
    if new:
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        builder = _builder(directory, manifest, settings, sketcher, on_skip)
        registry = IdRegistry()
        for path, fingerprint in new:
            stem = f"shards/{len(manifest.shards):06d}"
            documents = _unique(iter_documents([path], data.id_field, data.text_field, on_skip=on_skip,
                                               on_bad_row=data.on_bad_row), registry)
            manifest.shards.append(builder.add_shard(path, fingerprint, stem, documents))
        previous = dict(manifest.files)
        manifest.generation += 1
        manifest.files = builder.finish(manifest.generation)
        write_manifest(directory, manifest)
        for name in previous.values():
            (directory / name).unlink(missing_ok=True)
    return UpdateSummary(
        directory, settings.kind, len(new), manifest.documents - documents_before, len(manifest.shards),
        manifest.documents, time.perf_counter() - started, already,
        index_footprint(settings, len(sketcher.tracked)).document_bytes if sketcher is not None else None,
    )


def open_or_create(directory: Path, settings: PrefilterSettings, data: DataSettings, shards: Sequence[Path],
                   sketcher: DocumentSketcher | None) -> IndexManifest:
    """The manifest of the index at ``directory``, checked against the settings, or a new one with no
    shards (a gradient index's basis and codes are then fitted on a sample of ``shards`` and stored)."""
    create = not (directory / MANIFEST_NAME).exists()
    if sketcher is not None:
        sketcher.fit_or_load(directory, create, shards, _structure(settings))
    if create:
        description, fingerprint = encoder_identity(settings, sketcher)
        return IndexManifest(settings.kind, data.id_field, data.text_field, description, fingerprint, _structure(settings))
    manifest = read_manifest(directory)
    _check_encoder(directory, manifest, settings, sketcher)
    wanted = (_structure(settings), data.id_field, data.text_field)
    if wanted != (manifest.structure, manifest.id_field, manifest.text_field):
        raise PrefilterError(
            f"prefilter index {directory} was built with index structure {manifest.structure} and fields "
            f"{manifest.id_field!r}/{manifest.text_field!r}; these settings ask for {wanted[0]} and "
            f"{data.id_field!r}/{data.text_field!r}: use the same, or another prefilter.path"
        )
    return manifest


def _unique(documents: Iterable[Document], registry: IdRegistry) -> Iterator[Document]:
    """Ids must be unique across the shards of one build, as they must be within a scoring run."""
    for doc in documents:
        registry.add(doc.id, Path(doc.shard), doc.row)
        yield doc


def _builder(directory: Path, manifest: IndexManifest, settings: PrefilterSettings, sketcher: DocumentSketcher | None,
             on_skip: SkipHandler) -> sparse.SparseBuilder | dense.DenseBuilder | SketchBuilder:
    if manifest.kind == "dense":
        return dense.DenseBuilder(directory, manifest, settings)
    if sketcher is not None:
        return SketchBuilder(directory, manifest, sketcher, on_skip)
    return sparse.SparseBuilder(directory, manifest)


def open_index(directory: str | Path, settings: PrefilterSettings, corpus: Sequence[Path] | None = None) -> Retriever:
    """The index at ``directory``, checked against ``settings``; searching only ``corpus`` (all shards if None).

    PrefilterError, naming the directory, when it is missing or corrupt, of another kind,
    built with another encoder, or lacks a shard of ``corpus``.
    """
    _require_kind(settings)
    directory = Path(directory)
    manifest = read_manifest(directory)
    # A gradient index's encoder is the scored model: the query side checks it when it loads that model.
    if settings.kind != "gradient":
        _check_encoder(directory, manifest, settings, None)
    if corpus is None:
        selection = {position: shard.path for position, shard in enumerate(manifest.shards)}
    else:
        selection = select_shards(directory, manifest, corpus)
    openers: dict[str, Callable[..., Retriever]] = {"dense": dense.DenseIndex, "gradient": SketchIndex}
    return openers.get(manifest.kind, sparse.SparseIndex)(directory, manifest, settings, selection)


def run_build_index(
    settings: PrefilterSettings, data: DataSettings, output_dir: str | Path, config: dict[str, Any],
    model: ModelSettings | None = None,
    store: Path | None = None,
) -> UpdateSummary:
    """The build_index job: create or extend the index, and write ``runs/<run_id>.json`` with every skip.
    ``model`` and ``store``: the scored model and factor store, which the ``gradient`` kind sketches with."""
    if data.path is None:
        raise SettingsError("data.path must be set (the jobs fill it in with the demo corpus)")
    record = RunRecord(job="build_index", config=config)
    directory = settings.index_path(output_dir)
    summary = update_index(directory, settings, data, list_shards(data.path), record.skip, model, store)
    record.lap("build")
    record.counts = {
        "shards_added": summary.shards_added,
        "documents_added": summary.documents_added,
        "shards": summary.shards,
        "documents": summary.documents,
        "skipped": len(record.skips),
    }
    record.config["already_indexed_shards"] = summary.already_indexed
    record.outputs = {"index": str(directory)}
    record.write(output_dir)
    return summary
