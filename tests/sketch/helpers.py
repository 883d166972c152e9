"""A tiny model, its corpus, factor store and queries, shared by the gradient prefilter's tests."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from attribution.fitting import run_fit
from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings
from tests.prefilter.helpers import TEXTS, write_corpus
from tests.tiny import save_tiny_lm

QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " the mat"},
    {"id": "q-river", "prompt": "a river flows past", "completion": " the old mill"},
]
DATA = {"max_length": 16, "batch_size": 3}


def fitted_world(root: Path) -> tuple[list[Path], ModelSettings, DataSettings, FactorSettings, QuerySettings]:
    """The prefilter tests' corpus in three shards, a tiny LM over it, its EK-FAC store and two queries."""
    shards = write_corpus(root / "corpus")
    model_dir = save_tiny_lm(root / "model", TEXTS + [q["prompt"] + q["completion"] for q in QUERIES])
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=str(root / "corpus"), **DATA)
    factors = run_fit(model, data, FactorSettings(), root, {}, progress=False)
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return shards, model, data, FactorSettings(path=str(factors.factors_path)), QuerySettings(path=str(queries))


def stored_vectors(directory: Path) -> dict[str, np.ndarray]:
    """Each stored document's decoded sketch, read back from its shard's FAISS file."""
    manifest = json.loads((directory / "manifest.json").read_text())
    vectors = {}
    for shard in manifest["shards"]:
        index = faiss.read_index(str(directory / f"{shard['stem']}.faiss"))
        ids = np.load(directory / f"{shard['stem']}.ids.npy")
        vectors.update(zip(ids, index.reconstruct_n(0, index.ntotal).astype(np.float64)))
    return vectors
