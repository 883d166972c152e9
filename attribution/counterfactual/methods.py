"""Every compared method's score of every (document, query) pair, from the product itself.

Factor strategies (closed form or refined) go through the engine: :func:`run_fit` on the first
``fit_sequences`` documents (one store per strategy, kept and reused), then :func:`run_score` with
``score.top_k=all``, whose pairs dataset ``pairs/run_id=<run>/`` is read back with pyarrow; the
refinement's sample is the same fit sample (``refine.max_sequences = fit_sequences``, data = the
store's), so closed form, refinement and the PBRF share one G. Each store has its own folder,
``<output_dir>/engine/<strategy>-<hash of the fit inputs>/``, holding the store and its score runs,
so a finished score run is only ever reused for the store it was scored with. BM25 scores come
from the prefilter's index (``attribution.evaluation.candidates.bm25_ranking``).

Dampings: a relative value is a multiple of the mean eigenvalue of G over all tracked modules,
``trace / P`` of the EK-FAC fit (the unit of ``jobs.evaluate``), passed to every damped method as the
same absolute ``factors.damping``; null is the engine's default, 0.1 x each module's own mean.

With the benchmark's fine-tuning stage, a method's ``stage`` picks its gradients: ``pretrained`` as
above; ``finetuned`` the fine-tuned model's, on a store of that model fitted on the same corpus
documents; ``multi`` the engine's multi-stage scoring, pretrained store plus a store of the fine-tuned
model fitted on its fine-tuning rows (``finetune.*``). Every store's damping is the same multiple of
its own mean eigenvalue (``methods.NAME.finetune_damping`` sets the fine-tuning rows' store's).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import torch

from attribution.counterfactual.benchmarks import FinetuneStage
from attribution.counterfactual.settings import MethodSpec
from attribution.curvature.store import MANIFEST, load_factors
from attribution.data.corpus import list_shards
from attribution.data.queries import Query
from attribution.evaluation.candidates import bm25_ranking
from attribution.fitting import run_fit
from attribution.models import TrackedModule
from attribution.prefilter.index import run_build_index
from attribution.runs import write_json_atomically
from attribution.scoring.markers import file_fingerprint
from attribution.scoring.run import run_score
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
)

FIT_RECORD = "fit.json"
# The stores a method can need: the pretrained model on the corpus, the fine-tuned model on the corpus
# (single-stage on it) and on its fine-tuning rows (the fine-tuned stage of multi-stage scoring).
STORE_STAGES = ("pretrained", "finetuned", "finetune_rows")


@dataclass(frozen=True)
class Damping:
    """One damping of the sweep: ``value`` as configured, ``absolute`` what the engine is given."""

    value: float | None
    absolute: float | None
    relative: float  # absolute / mean eigenvalue (NaN for the engine's default)

    @property
    def label(self) -> str:
        if self.value is None:
            return "default"
        return f"{self.relative:g}x"


@dataclass
class MethodScores:
    """A method's (documents, queries) scores at one damping, what they cost and how they were made."""

    name: str
    spec: MethodSpec
    damping: Damping | None  # None: the method has no damping
    steps: int | None  # refined methods: the step budget
    scores: np.ndarray
    seconds: float
    detail: str
    module_damping: dict[str, float]  # per module, as the engine applied it (empty: none)
    run_id: str | None = None
    pairs_path: str | None = None  # the engine's pairs dataset (every pair's score), for a user to read


class Engine:
    """Fits, score runs and BM25 for the job, each kept under ``<output_dir>/engine`` and reused;
    ``finetune`` the benchmark's fine-tuning stage, when the job has one."""

    def __init__(self, model: ModelSettings, data: DataSettings, queries: QuerySettings, score: ScoreSettings,
                 cluster: ClusterSettings, fit_sequences: int, output_dir: Path, doc_ids: Sequence[str],
                 query_list: Sequence[Query], config: dict[str, Any], tracked: Sequence[TrackedModule],
                 finetune: FinetuneStage | None = None) -> None:
        self.model = model
        self.data = data
        self.queries = queries
        self.score_settings = replace(score, top_k="all", bottom_k=0, token_scores=False, layer_scores=False)
        self.cluster = cluster
        self.fit_sequences = fit_sequences
        self.root = output_dir / "engine"
        self.doc_ids = list(doc_ids)
        self.query_list = list(query_list)
        self.query_ids = [query.id for query in query_list]
        self.config = config
        self.tracked = list(tracked)
        self.finetune = finetune
        self._fits: dict[tuple[str, str], tuple[Path, float]] = {}
        self._mean_eigenvalues: dict[str, float] = {}

    def stage_inputs(self, stage: str) -> tuple[ModelSettings, DataSettings, int | None]:
        """The model, the data and the sequence limit of ``stage``'s store (one of :data:`STORE_STAGES`)."""
        if stage not in STORE_STAGES:
            raise ValueError(f"stage={stage!r}: expected one of {', '.join(STORE_STAGES)}")
        if stage == "pretrained":
            return self.model, self.data, self.fit_sequences
        if self.finetune is None:
            raise ValueError(f"the {stage} store needs the benchmark's fine-tuning stage")
        model = replace(self.model, path=str(self.finetune.model_dir))
        if stage == "finetuned":
            return model, self.data, self.fit_sequences
        # Every fine-tuning row: the stage's whole training set, as the fine-tuned store of a user's multi-stage run.
        return model, replace(self.data, path=str(self.finetune.rows_path)), None

    def store(self, strategy: str, stage: str = "pretrained") -> tuple[Path, float]:
        """The folder of ``strategy``'s store for ``stage`` (fitted now unless a matching one is kept) and its fit seconds."""
        if (strategy, stage) in self._fits:
            return self._fits[(strategy, stage)]
        model, data, sequences = self.stage_inputs(stage)
        factors = FactorSettings(strategy=strategy, max_sequences=sequences)
        inputs = {"factors": asdict(factors), "data": asdict(data), "model": asdict(model),
                  "weights": [file_fingerprint(p) for p in sorted(Path(str(model.path)).glob("*.safetensors"))],
                  "corpus": [file_fingerprint(p) for p in list_shards(data.path)]}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]
        folder = self.root / (f"{strategy}-{key}" if stage == "pretrained" else f"{strategy}-{stage}-{key}")
        record = folder / FIT_RECORD
        if strategy == "identity":
            seconds = 0.0
        elif record.is_file() and (folder / "factors" / MANIFEST).is_file():
            seconds = json.loads(record.read_text())["seconds"]
        else:
            # In this process: a fit of the few fit_sequences takes seconds, less than starting Ray workers.
            fit = run_fit(model, data, replace(factors, path=str(folder / "factors")), folder, self.config, progress=False)
            seconds = fit.seconds
            write_json_atomically(record, {"seconds": seconds, "inputs": inputs})
        self._fits[(strategy, stage)] = (folder, seconds)
        return folder, seconds

    def mean_eigenvalue(self, stage: str = "pretrained") -> float:
        """``trace(G) / P`` of ``stage``'s EK-FAC fit: its corrected eigenvalues sum to the trace of each block.
        Every stage's model has the tracked modules of the pretrained one (the fine-tuned model is a copy trained on)."""
        if stage not in self._mean_eigenvalues:
            folder, _ = self.store("ekfac", stage)
            factors = load_factors(folder / "factors", self.tracked, None)
            values = [f.corrected_eigenvalues.to(torch.float64) for f in factors.modules.values()]
            self._mean_eigenvalues[stage] = float(sum(v.sum() for v in values) / sum(v.numel() for v in values))
        return self._mean_eigenvalues[stage]

    def method_scores(self, spec: MethodSpec, damping: Damping) -> MethodScores:
        """One engine score run of ``spec`` at ``damping`` (ignored by the gradient dot product), every pair."""
        if spec.kind == "bm25":
            return self.bm25(spec)
        stage = "finetuned" if spec.stage == "finetuned" else "pretrained"
        model, _, _ = self.stage_inputs(stage)
        folder, fit_seconds = self.store(spec.kind, stage)
        factors = FactorSettings(strategy=spec.kind, path=None if spec.kind == "identity" else str(folder / "factors"),
                                 damping=self._stage_damping(damping.relative, damping.absolute, stage)
                                 if spec.damped else None)
        finetune = FinetuneSettings()
        if spec.stage == "multi":
            rows_folder, rows_seconds = self.store(spec.kind, "finetune_rows")
            fit_seconds += rows_seconds
            multiple = damping.relative if spec.finetune_damping is None else spec.finetune_damping
            finetune = FinetuneSettings(model_path=str(self.stage_inputs("finetuned")[0].path),
                                        factors_path=str(rows_folder / "factors"),
                                        damping=self._stage_damping(multiple, None, "finetune_rows"))
        refine = spec.refine
        if refine.enabled and refine.data_path is None:
            refine = replace(refine, max_sequences=self.fit_sequences)
        prefilter = self.prefilter(spec, folder, model)
        score = replace(self.score_settings, normalize=spec.normalize)
        summary = run_score(model, self.data, factors, self.queries, score, folder, self.config,
                            finetune_settings=finetune, prefilter_settings=prefilter, cluster=self.cluster,
                            refine_settings=refine)
        record = json.loads(Path(summary.run_record).read_text())
        scores = self._pairs_matrix(Path(summary.scores_path))
        module_damping = record["config"]["damping"].get("model", {}) if spec.damped else {}
        detail = _refinement_detail(refine, record["config"].get("query_diagnostics", {}))
        if spec.stage != "pretrained":
            detail = f"{STAGE_DETAIL[spec.stage]}; {detail}"
        if spec.normalize:
            detail = f"{detail}; unit-normalised: each document's scores divided by its gradient norm"
        return MethodScores(spec.name, spec, damping if spec.damped else None, refine.steps if refine.enabled else None,
                            scores, fit_seconds + summary.seconds, detail, module_damping, summary.run_id,
                            str(summary.scores_path))

    def _stage_damping(self, multiple: float, absolute: float | None, stage: str) -> float | None:
        """The absolute damping of ``stage``'s store: ``absolute`` for the pretrained one, the same ``multiple`` of
        its own mean eigenvalue for the others; None (NaN multiple) is the engine's default per module."""
        if math.isnan(multiple):
            return None
        return absolute if stage == "pretrained" else multiple * self.mean_eigenvalue(stage)

    def prefilter(self, spec: MethodSpec, folder: Path, model: ModelSettings) -> PrefilterSettings:
        """``spec``'s prefilter with its index built (or extended) under ``<output_dir>/engine/prefilter``,
        one folder per index setting; gradient sketches are whitened by, and kept beside, the method's store."""
        settings = spec.prefilter
        if settings.kind == "none":
            return settings
        index = {k: v for k, v in asdict(settings).items() if k != "top_m"}
        key = hashlib.sha256(json.dumps(index, sort_keys=True, default=str).encode()).hexdigest()[:12]
        base = folder if settings.kind == "gradient" else self.root
        settings = replace(settings, path=str(base / "prefilter" / f"{settings.kind}-{key}"))
        run_build_index(settings, self.data, base, self.config, model, folder / "factors")
        return settings

    def bm25(self, spec: MethodSpec) -> MethodScores:
        """BM25 of prompt + completion against every document (0 where no word is shared)."""
        shards = list_shards(self.data.path)
        ranking = bm25_ranking(self.query_list, self.data, shards, self.root / "bm25", len(self.doc_ids), _recorded_elsewhere)
        scores = np.array([[ranking.score(q, d) for q in self.query_ids] for d in self.doc_ids], dtype=np.float64)
        return MethodScores(spec.name, spec, None, None, scores, ranking.build_seconds + ranking.query_seconds,
                            "BM25 of prompt + completion (prefilter index)", {})

    def _pairs_matrix(self, path: Path) -> np.ndarray:
        """The pairs dataset as a (documents, queries) array, NaN where a pair was not scored."""
        table = ds.dataset(path, format="parquet", partitioning="hive").to_table(columns=["query_id", "doc_id", "score"])
        rows = {doc_id: n for n, doc_id in enumerate(self.doc_ids)}
        columns = {query_id: q for q, query_id in enumerate(self.query_ids)}
        matrix = np.full((len(self.doc_ids), len(self.query_ids)), np.nan)
        documents = [rows[d] for d in table["doc_id"].to_pylist()]
        queries = [columns[q] for q in table["query_id"].to_pylist()]
        matrix[documents, queries] = table["score"].to_numpy()
        return matrix


STAGE_DETAIL = {"finetuned": "single-stage on the fine-tuned model",
                "multi": "multi-stage: fine-tuned query through both stages' inverses"}


def dampings(values: Sequence[float | None], relative: bool, mean_eigenvalue: float) -> list[Damping]:
    """Each configured damping as the engine's absolute ``factors.damping`` (null stays null)."""
    result = []
    for value in values:
        if value is None:
            result.append(Damping(None, None, float("nan")))
        else:
            absolute = value * mean_eigenvalue if relative else value
            result.append(Damping(value, absolute, absolute / mean_eigenvalue))
    return result


def _refinement_detail(refine: RefineSettings, diagnostics: dict[str, list[dict]]) -> str:
    """Gauss-Newton products and relative residuals of a refined run, as ranges over its queries."""
    if not refine.enabled:
        return "closed form"
    rows = [d for stages in diagnostics.values() for d in stages]
    if not rows:
        return f"{refine.method}, {refine.steps} steps"
    products = [d["gauss_newton_products"] for d in rows]
    residuals = [d["relative_residual"] for d in rows]
    fallbacks = sum(1 for d in rows if d.get("fallback"))
    text = (f"{refine.method}: {min(products)}-{max(products)} products, relative residual "
            f"{min(residuals):.1e}-{max(residuals):.1e}")
    return text + (f", {fallbacks} fell back to the closed form" if fallbacks else "")


def _recorded_elsewhere(skip: Any) -> None:
    """The engine's score runs record every skipped document; BM25 reads the same corpus."""
