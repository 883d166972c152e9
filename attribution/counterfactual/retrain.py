"""Retrain a benchmark's model on a subset of its corpus with its own recipe, keep it, and measure it.

One (subset, seed) is one task. Its model is kept as a Hugging Face folder (safetensors weights,
config, the benchmark's tokenizer) under

    <output_dir>/retrain/<benchmark fingerprint>/subset-<j>-seed-<k>-<key>/   (LDS subsets)
    <output_dir>/retrain/<benchmark fingerprint>/removal-seed-<k>-<key>/      (top-k removal)

with ``retrained.json``, the marker: the task's key (a hash of the recipe version, the benchmark's
config fingerprint, the subset's document ids and the seed), what it trained on and how long it
took. The folder is built beside its final place and renamed into it, so a folder with a marker is
always complete and a killed task leaves nothing a rerun would trust. The measurements of a query
file live in ``measurements/<queries key>.json`` inside it (written atomically too), so new queries
are measured on the kept models without retraining them.

With a fine-tuning stage in the recipe, the pretrained model is then fine-tuned with the benchmark's
fine-tuning recipe (:func:`~attribution.demo.train.finetune`, its own seed, the same for every task)
into ``finetuned-<key>/`` inside that folder, keyed by the pretrained model's key, the fine-tuning
recipe and its rows, kept the same way, and the queries are measured on it. A pretrained model kept
by a run without the fine-tuning stage is fine-tuned, not retrained.

Training seed k is ``train.seed + k``: seed 0 starts from the initialisation of the model
being attributed (the same torch seed draws the same initial weights), and every subset shares
it. The recipe's ``batches`` says what else subsets share: with ``subset`` each subset's documents
are shuffled into batches of their own, so subsets also differ in the batch order their documents
imply; with ``corpus`` every subset walks the whole corpus's batches in the order the seed gives them
(:class:`~attribution.demo.train.CorpusPlaces`), less the documents it leaves out, so two subsets
differ only in the batches that held the documents they differ in. Dropping 1% of the corpus moves a
measurement less than a new batch order does, so ``corpus`` is what makes small removals measurable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from attribution.counterfactual.measure import measure_queries
from attribution.counterfactual.subsets import Subset
from attribution.data.corpus import Skip, iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.demo.train import (
    DEMO_VERSION,
    CorpusPlaces,
    DemoFinetuneConfig,
    DemoModelConfig,
    DemoTrainConfig,
    finetune,
    pretrain,
)
from attribution.models import load_model
from attribution.runs import write_json_atomically
from attribution.scoring.shards import inject_fault_for_tests

# Bump when this module changes what a key produces, so kept models are not reused.
RECIPE_VERSION = 1
MARKER = "retrained.json"
FAULT_TARGET = "retrain"


@dataclass(frozen=True)
class Recipe:
    """What every retrained model shares: the model's shape and training recipe (the demo's,
    :func:`~attribution.demo.train.pretrain`), the fingerprint of the benchmark build whose model it
    reproduces, and where that build's tokenizer and corpus are; ``finetune`` and ``finetune_rows``
    (prompt/completion JSONL), when set, the fine-tuning stage every retrained model goes through;
    ``batches`` (``subset`` or ``corpus``) how a subset is cut into batches (module docstring)."""

    model: DemoModelConfig
    train: DemoTrainConfig
    fingerprint: str
    model_dir: str
    corpus_dir: str
    finetune: DemoFinetuneConfig | None = None
    finetune_rows: str | None = None
    batches: str = "corpus"


@dataclass(frozen=True)
class RetrainTask:
    """Train on ``subset`` with seed offset ``seed`` (unless kept), then measure the queries of ``queries_path``."""

    recipe: Recipe
    subset: Subset
    seed: int
    root: str  # <output_dir>/retrain
    queries_path: str
    queries_key: str
    max_length: int
    position: int  # the task's place in the run; the test fault switch counts these
    # The folder's name: subset-<j> for an LDS subset; a removal model is named by its documents alone
    # (the key), so every (method, query) that removes the same documents shares one model.
    label: str | None = None

    @property
    def key(self) -> str:
        payload = {"recipe_version": RECIPE_VERSION, "demo_version": DEMO_VERSION, "demo": self.recipe.fingerprint,
                   "documents": list(self.subset.doc_ids), "seed": self.seed, "batches": self.recipe.batches}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def directory(self) -> Path:
        label = self.label or f"subset-{self.subset.index:04d}"
        return Path(self.root) / self.recipe.fingerprint / f"{label}-seed-{self.seed}-{self.key}"

    @cached_property
    def finetune_key(self) -> str | None:
        """The fine-tuned model's identity: the pretrained model's key, the fine-tuning recipe and its rows."""
        recipe = self.recipe
        if recipe.finetune is None:
            return None
        payload = {"pretrained": self.key, "finetune": asdict(recipe.finetune),
                   "rows": hashlib.sha256(Path(str(recipe.finetune_rows)).read_bytes()).hexdigest()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def measured_directory(self) -> Path:
        """The model the queries are measured on: the fine-tuned one when the recipe has that stage."""
        key = self.finetune_key
        return self.directory if key is None else self.directory / f"finetuned-{key}"

    @property
    def measurements_path(self) -> Path:
        return self.measured_directory / "measurements" / f"{self.queries_key}.json"

    def trained(self) -> bool:
        return _marked(self.directory, self.key)

    def finetuned(self) -> bool:
        key = self.finetune_key
        return key is None or _marked(self.measured_directory, key)

    def finished(self) -> bool:
        return self.trained() and self.finetuned() and self.measurements_path.is_file()


@dataclass(frozen=True)
class TaskOutcome:
    """One task's measurements; ``trained`` says whether this run trained it (False: it was kept)."""

    subset: int
    seed: int
    measurements: dict[str, float]
    trained: bool
    train_seconds: float
    final_loss: float
    skips: list[dict[str, Any]] = field(default_factory=list)


def queries_key(path: str | Path, max_length: int) -> str:
    """The queries' identity: a hash of the files' content and of the length they are batched to."""
    digest = hashlib.sha256(str(max_length).encode())
    for file in list_shards(path):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


def retrain_and_measure(task: RetrainTask) -> TaskOutcome:
    """The task's measurements, training (and keeping) its model first when no kept one matches, then
    fine-tuning it when the recipe has that stage and no kept fine-tuned model matches."""
    trained = not task.trained()
    model = tokenizer = None
    if trained:
        inject_fault_for_tests(FAULT_TARGET, task.position)
        model, tokenizer = _train_and_keep(task)
    # The pretraining's marker: its seconds, and its final loss (fine-tuning's is on other data).
    pretrained = json.loads((task.directory / MARKER).read_text())
    seconds = pretrained["seconds"]
    if not task.finetuned():
        if model is None:
            model, tokenizer = load_model(task.directory)
        model = _finetune_and_keep(task, model, tokenizer)
        trained = True
    if task.finetune_key is not None:
        seconds += json.loads((task.measured_directory / MARKER).read_text())["seconds"]
    if not task.measurements_path.is_file():
        if model is None:
            model, tokenizer = load_model(task.measured_directory)
        skips: list[Skip] = []
        queries = read_queries(task.queries_path, on_skip=skips.append)
        values = measure_queries(model, tokenizer, queries, task.max_length, skips.append)
        write_json_atomically(task.measurements_path, {"queries_path": task.queries_path, "measurements": values,
                                                       "skips": [asdict(skip) for skip in skips]})
    stored = json.loads(task.measurements_path.read_text())
    return TaskOutcome(task.subset.index, task.seed, stored["measurements"], trained, seconds, pretrained["final_loss"],
                       stored["skips"])


def _marked(folder: Path, key: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def _train_and_keep(task: RetrainTask) -> tuple[Any, Any]:
    """Train with the benchmark's recipe and rename the finished folder into place."""
    from transformers import AutoTokenizer

    recipe = task.recipe
    tokenizer = AutoTokenizer.from_pretrained(task.recipe.model_dir, local_files_only=True)
    wanted = set(task.subset.doc_ids)
    documents = list(iter_documents(list_shards(task.recipe.corpus_dir), "id", "text", on_skip=_no_skip))
    kept = [place for place, doc in enumerate(documents) if doc.id in wanted]
    texts = [documents[place].text for place in kept]
    if len(texts) != len(wanted):
        raise ValueError(f"subset {task.subset.index}: {len(wanted) - len(texts)} of its documents are not in "
                         f"{task.recipe.corpus_dir}")
    places = CorpusPlaces(tuple(kept), len(documents)) if recipe.batches == "corpus" else None
    started = time.perf_counter()
    model, result = pretrain(texts, tokenizer, recipe.model, replace(recipe.train, seed=recipe.train.seed + task.seed),
                             show_progress=False, corpus=places)
    seconds = time.perf_counter() - started
    marker = {"key": task.key, "subset": task.subset.index, "seed": task.seed,
              "training_seed": recipe.train.seed + task.seed, "demo_fingerprint": task.recipe.fingerprint,
              "recipe_version": RECIPE_VERSION, "batches": recipe.batches, "num_documents": len(texts),
              "documents": list(task.subset.doc_ids),
              "seconds": round(seconds, 3), "final_loss": result.final_loss, "torch_threads": torch.get_num_threads()}
    _keep(model, tokenizer, marker, task.directory)
    return model, tokenizer


def _finetune_and_keep(task: RetrainTask, model: Any, tokenizer: Any) -> Any:
    """The recipe's fine-tuning stage on the task's pretrained model, kept in ``task.measured_directory``."""
    recipe = task.recipe
    assert recipe.finetune is not None and recipe.finetune_rows is not None
    rows = [json.loads(line) for line in Path(recipe.finetune_rows).read_text().splitlines() if line.strip()]
    tuned, seconds = finetune(model, tokenizer, rows, recipe.finetune, show_progress=False)
    marker = {"key": task.finetune_key, "pretrained_key": task.key, "finetune": asdict(recipe.finetune),
              "rows": recipe.finetune_rows, "num_rows": len(rows), "seconds": round(seconds, 3),
              "torch_threads": torch.get_num_threads()}
    _keep(tuned, tokenizer, marker, task.measured_directory)
    return tuned


def _keep(model: Any, tokenizer: Any, marker: dict[str, Any], final: Path) -> None:
    """Save the model with its marker beside ``final`` and rename it into place: a folder with a marker is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, final)
        except OSError:
            # A retried task raced a first attempt to the same key: keep the winner's (identical) model.
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _no_skip(skip: Skip) -> None:
    raise ValueError(f"benchmark corpus document {skip.item_id} cannot be read: {skip.reason}")
