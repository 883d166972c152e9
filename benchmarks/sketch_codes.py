"""How recall depends on the basis sample and the bits per coordinate, at a fixed number of coordinates.

Reads what ``python -m jobs.sketch_benchmark`` kept under OUTPUT_DIR for the large corpus (the whole
k = 64 index, the queries, the full pass's top 100) and, without another pass over the corpus,
recompresses the stored whole sketches: each module's basis from SAMPLE documents (``first``: the
corpus' first ones; ``random``: drawn with numpy, seed 0), C coordinates, stored in BITS bits with
FAISS's per-coordinate quantiser trained on that sample. One line per (sample, C, bits): recall at
1%, 5% and 10% of the corpus, as the benchmark measures it.

    python benchmarks/sketch_codes.py OUTPUT_DIR SAMPLE:N:C[,SAMPLE:N:C...] BITS[,BITS...]

e.g. ``python benchmarks/sketch_codes.py outputs/sketch_benchmark first:2048:256,random:2048:256 16,8,4``
(docs/prefilter.md). The whole sketches are read once into a float16 cache under OUTPUT_DIR/codes
(50,000 documents x 16 modules x 4,096: 6.5 GB); C = 2,048 needs about 10 GB of memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

from attribution.data.queries import read_queries
from attribution.demo.train import ensure_demo
from attribution.prefilter.index import open_index
from attribution.scoring.inputs import ScoreInputs
from attribution.settings import DataSettings, FactorSettings, ModelSettings, PrefilterSettings, QuerySettings, ScoreSettings
from attribution.sketch.basis import principal_directions
from attribution.sketch.queries import query_sketcher
from attribution.studies.sketch_recall import recall

QUANTIZERS = {16: faiss.ScalarQuantizer.QT_fp16, 8: faiss.ScalarQuantizer.QT_8bit, 4: faiss.ScalarQuantizer.QT_4bit}
BLOCK = 5000


def whole_sketches(output: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Documents' whole sketches (memory-mapped float16), their ids, the queries' sketches and ids."""
    directory = output / "large" / "gradient-k64"
    if not (cache / "documents.npy").is_file():
        manifest = json.loads((directory / "manifest.json").read_text())
        ids, parts = [], []
        for shard in manifest["shards"]:
            index = faiss.read_index(str(directory / f"{shard['stem']}.faiss"))
            parts.append(index.reconstruct_n(0, index.ntotal).astype(np.float16))
            ids += list(np.load(directory / f"{shard['stem']}.ids.npy"))
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "documents.npy", np.concatenate(parts))
        np.save(cache / "ids.npy", np.array(ids))
    if not (cache / "queries.npy").is_file():
        prefilter = PrefilterSettings(kind="gradient", path=str(directory), sketch_dim=64, sketch_components=None,
                                      sketch_bits=16)
        score = ScoreSettings(rank=32, top_k=100, query_batch_size=64, token_scores=False, progress=False)
        inputs = ScoreInputs(ModelSettings(path=str(ensure_demo().model_dir), device="cpu"),
                             DataSettings(path=str(output / "large-corpus")), FactorSettings(path=str(output / "factors")),
                             QuerySettings(path=str(output / "queries.jsonl")), score, prefilter=prefilter)
        queries = read_queries(str(output / "queries.jsonl"), on_skip=lambda skip: None)
        sketches = query_sketcher(inputs, directory, open_index(directory, prefilter).manifest, output / "large")(queries)
        kept = [query.id for query in queries if query.id in sketches]
        np.save(cache / "queries.npy", np.stack([sketches[query] for query in kept]))
        np.save(cache / "query_ids.npy", np.array(kept))
    return (np.load(cache / "documents.npy", mmap_mode="r"), np.load(cache / "ids.npy"),
            np.load(cache / "queries.npy").astype(np.float32), list(np.load(cache / "query_ids.npy")))


def coordinates(documents: np.ndarray, queries: np.ndarray, sample: np.ndarray, modules: int,
                c: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document's and query's C coordinates per module in the sample's principal directions."""
    width = documents.shape[1] // modules
    document_parts, query_parts = [], []
    for module in range(modules):
        columns = slice(module * width, (module + 1) * width)
        basis = principal_directions(torch.from_numpy(np.asarray(documents[sample, columns], np.float64)), c).float().numpy()
        block = np.empty((len(documents), basis.shape[1]), np.float32)
        for start in range(0, len(documents), BLOCK):
            block[start:start + BLOCK] = np.asarray(documents[start:start + BLOCK, columns], np.float32) @ basis
        document_parts.append(block)
        query_parts.append(queries[:, columns] @ basis)
    return np.concatenate(document_parts, 1), np.ascontiguousarray(np.concatenate(query_parts, 1))


def coded_recall(documents: np.ndarray, queries: np.ndarray, sample: np.ndarray, bits: int, ids: np.ndarray,
                 query_ids: list[str], truth: dict[str, list[str]]) -> dict[str, float]:
    index = faiss.IndexScalarQuantizer(documents.shape[1], QUANTIZERS[bits], faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(documents[sample]))
    index.add(documents)
    sizes = {fraction: round(fraction * len(ids)) for fraction in (0.01, 0.05, 0.1)}
    _, rows = index.search(queries, max(sizes.values()))
    return {f"{fraction:.0%}": recall(truth, {query: list(ids[row[:m]]) for query, row in zip(query_ids, rows)})
            for fraction, m in sizes.items()}


def main(output: Path, plans: list[tuple[str, int, int]], bits: list[int]) -> None:
    torch.set_num_threads(1)
    documents, ids, queries, query_ids = whole_sketches(output, output / "codes")
    truth = json.loads((output / "stages" / "large-truth.json").read_text())["top"]
    modules = len(json.loads((output / "large" / "gradient-k64" / "manifest.json").read_text())["encoder"]["modules"])
    rng = np.random.default_rng(0)
    for kind, n, c in plans:
        sample = np.arange(n) if kind == "first" else np.sort(rng.choice(len(ids), n, replace=False))
        coded, query_coordinates = coordinates(documents, queries, sample, modules, c)
        for b in bits:
            found = coded_recall(coded, query_coordinates, sample, b, ids, query_ids, truth)
            print(json.dumps({"sample": kind, "documents": n, "components": c, "bits": b, "recall": found}), flush=True)


if __name__ == "__main__":
    plans = [(kind, int(n), int(c)) for kind, n, c in (plan.split(":") for plan in sys.argv[2].split(","))]
    main(Path(sys.argv[1]), plans, [int(b) for b in sys.argv[3].split(",")])
