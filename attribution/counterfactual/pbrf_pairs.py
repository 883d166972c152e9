"""The PBRF of a handful of (query, document) pairs, kept per document, and each method's agreement with it.

Documents: the first true source (``source_ids``) of each of the first queries that have one, for
half of them (the pairs where influence is large), and documents drawn at random with the seed
for the rest (where it is small); queries: the first ``pbrf.queries``. Each document's responses
(one L-BFGS solve, every query measured on its result) are kept in
``<output_dir>/pbrf/<key>.json``, the key hashing everything they depend on, so a rerun solves only
the documents it lacks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attribution.counterfactual.pbrf import PbrfResponse, PbrfSolve, ProximalObjective, pbrf_responses
from attribution.counterfactual.settings import PbrfSettings
from attribution.data.batching import TokenBatch, batch_documents, batch_queries
from attribution.data.corpus import Document
from attribution.data.queries import Query
from attribution.evaluation.metrics import pearson, spearman
from attribution.runs import write_json_atomically


@dataclass
class PbrfPairs:
    """R(q, z) for ``doc_ids`` x ``query_ids`` (a (documents, queries) array) and how each solve went."""

    doc_ids: list[str]
    query_ids: list[str]
    responses: np.ndarray
    solves: dict[str, dict]
    epsilon: float
    module_damping: dict[str, float]

    def worst_relative_gradient(self) -> float:
        return max(solve["relative_gradient"] for solve in self.solves.values())

    def describe(self) -> str:
        iterations = [solve["iterations"] for solve in self.solves.values()]
        seconds = sum(solve["seconds"] for solve in self.solves.values())
        return (f"PBRF of {len(self.doc_ids)} documents x {len(self.query_ids)} queries (epsilon {self.epsilon:.3g}): "
                f"{min(iterations)}-{max(iterations)} L-BFGS iterations, gradient left <= {self.worst_relative_gradient():.1e} "
                f"of its start, {seconds:.0f} s")


@dataclass(frozen=True)
class Agreement:
    pearson: float
    spearman: float
    relative_error: float  # ||I - R|| / ||R||; NaN for a method with no damping (its scale is arbitrary)


def choose_documents(queries: Sequence[Query], doc_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """``ceil(count/2)`` true sources of distinct queries (fewer when few have one), then random documents."""
    known = set(doc_ids)
    chosen: list[str] = []
    for query in queries:
        if len(chosen) >= (count + 1) // 2:
            break
        source = next((s for s in query.source_ids if s in known and s not in chosen), None)
        if source is not None:
            chosen.append(source)
    pool = sorted(known - set(chosen))
    generator = np.random.default_rng(seed)
    extra = generator.choice(len(pool), size=min(count - len(chosen), len(pool)), replace=False)
    return chosen + [pool[i] for i in sorted(extra)]


def pbrf_pairs(objective: ProximalObjective, documents: Sequence[Document], queries: Sequence[Query], tokenizer: object,
               max_length: int, settings: PbrfSettings, epsilon: float, cache: Path, identity: Mapping[str, object]) -> PbrfPairs:
    """The responses of every document in ``documents`` (kept in ``cache``), for ``queries``."""
    query_batch = _one_batch(batch_queries(tokenizer, queries, len(queries), max_length, _unusable))
    rows, solves = [], {}
    for document in documents:
        batch = _one_batch(batch_documents(tokenizer, [document], 1, max_length, _unusable))
        key = hashlib.sha256(json.dumps({**identity, "document": document.id, "text": document.text, "epsilon": epsilon,
                                         "steps": settings.steps, "tolerance": settings.tolerance,
                                         "queries": [asdict(q) for q in queries]},
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = cache / f"{key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            response = PbrfResponse(stored["doc_id"], stored["responses"], PbrfSolve(**stored["solve"]))
        else:
            response = pbrf_responses(objective, batch, query_batch, epsilon, settings.steps, settings.tolerance)
            write_json_atomically(path, {"doc_id": response.doc_id, "responses": response.responses,
                                         "solve": asdict(response.solve)})
        rows.append(response.responses)
        solves[document.id] = asdict(response.solve)
    return PbrfPairs([d.id for d in documents], list(query_batch.ids), np.array(rows, dtype=np.float64), solves, epsilon,
                     objective.module_damping)


def agreement(scores: np.ndarray, pairs: PbrfPairs, damped: bool) -> Agreement:
    """Correlations over the pairs of a method's scores (the same (documents, queries) block) with the PBRF."""
    mine, truth = scores.reshape(-1), pairs.responses.reshape(-1)
    error = float(np.linalg.norm(mine - truth) / np.linalg.norm(truth)) if damped else float("nan")
    return Agreement(pearson(mine, truth), spearman(mine, truth), error)


def _one_batch(batches) -> TokenBatch:
    (batch,) = list(batches)
    return batch


def _unusable(skip: object) -> None:
    raise ValueError(f"PBRF pair cannot be batched: {skip}")
