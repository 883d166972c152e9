"""How well and how cheaply the gradient prefilter finds what a full influence pass ranks first.

For the demo corpus and a large corpus (the demo's own documents plus documents recombining its
sentences, ``documents`` in all), with the demo model, a store fitted on the demo corpus and the
demo's 32 fact queries plus its 32 held-out question-form queries (64):

- **truth**: a full pass, every document scored, each query's top ``top`` documents kept;
- **recall**: for each sketch size k, the share of a query's true top documents found in its
  sketch top-M, for M a share of the corpus; the lexical (BM25) and sentence-embedding (MiniLM)
  prefilters at the same M for comparison (MiniLM only up to ``dense_max_documents``);
- **cost**: the sketch pass against a plain forward+backward pass over the same batches (the
  floor), a new batch of queries end to end through the index (query side, search, exact
  scoring of the top ``cost_fractions`` of the corpus per query) against the full pass, and the
  full pass keeping the sketches (``score.keep_sketches``) against the same pass without.

Every stage writes its result under ``output_dir`` when it ends; a rerun picks up from there.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attribution.benchmark import plain_forward_backward
from attribution.data.batching import batch_documents
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.demo.train import DemoPaths
from attribution.fitting import fit_request, fitted_for, run_fit
from attribution.models import load_model
from attribution.prefilter.candidates import search
from attribution.prefilter.index import open_index, update_index
from attribution.runs import write_json_atomically
from attribution.scoring.inputs import ScoreInputs
from attribution.scoring.run import run_score
from attribution.scoring.tables import read_ranked
from attribution.settings import (
    SKETCH_BITS,
    Check,
    DataSettings,
    FactorSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    ScoreSettings,
)
from attribution.sketch.queries import query_sketcher


@dataclass(frozen=True)
class SketchRecallSettings:
    """Mirrors ``sketch_benchmark`` in conf/sketch_benchmark.yaml."""

    documents: int = 50_000
    shards: int = 25
    sketch_dims: tuple[int, ...] = (16, 32, 64)
    # Sketches of component_sketch_dim compressed to C principal coordinates per module of B bits each, per [C, B].
    component_sketch_dim: int = 64
    compressed: tuple[tuple[int, int], ...] = ((256, 16), (512, 8), (1024, 4), (1536, 4), (2048, 4))
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    top: int = 100
    rank: int = 32
    cost_sketch_dim: int = 64
    cost_components: int | None = 1536
    cost_bits: int = 4
    cost_fractions: tuple[float, ...] = (0.002, 0.01, 0.05)
    dense_max_documents: int = 50_000
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("sketch_benchmark", self)
        check.integer("documents", 1)
        check.integer("shards", 1)
        check.integer("top", 1)
        check.integer("rank", 1)
        check.integer("cost_sketch_dim", 1)
        check.integer("component_sketch_dim", 1)
        check.integer("cost_components", 1, none="the whole sketch")
        if any(len(pair) != 2 or not isinstance(pair[0], int) or not 1 <= pair[0] <= self.component_sketch_dim**2
               or pair[1] not in SKETCH_BITS for pair in self.compressed):
            check.fail("compressed", f"a list of [C, bits] pairs, C from 1 to component_sketch_dim^2 = "
                                     f"{self.component_sketch_dim**2} and bits one of {', '.join(map(str, SKETCH_BITS))}")
        check.choice("cost_bits", SKETCH_BITS)
        check.integer("dense_max_documents", 0)
        check.integer("seed", 0)
        if not self.sketch_dims or any(not isinstance(k, int) or k < 1 for k in self.sketch_dims):
            check.fail("sketch_dims", "a list of positive integers")
        for key in ("fractions", "cost_fractions"):
            if not getattr(self, key) or any(not 0 < f <= 1 for f in getattr(self, key)):
                check.fail(key, "a list of shares of the corpus in (0, 1]")


def recombined_corpus(demo_corpus: Path, directory: Path, documents: int, shards: int, seed: int) -> Path:
    """The demo's documents, then documents of 2-4 of its sentences drawn at random, ``documents`` in all."""
    if directory.is_dir() and list_shards(directory):
        return directory
    rows = [{"id": doc.id, "text": doc.text} for doc in iter_documents(list_shards(demo_corpus), "id", "text",
                                                                       on_skip=lambda skip: None)]
    sentences = [sentence.strip() + "." for row in rows for sentence in row["text"].split(".") if sentence.strip()]
    rng = random.Random(seed)
    while len(rows) < documents:
        rows.append({"id": f"mix-{len(rows):06d}", "text": " ".join(rng.sample(sentences, rng.randint(2, 4)))})
    staging = directory.with_name(directory.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for index in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[index * size:(index + 1) * size]), staging / f"shard-{index:03d}.parquet")
    staging.rename(directory)
    return directory


def benchmark_queries(demo: DemoPaths, path: Path) -> Path:
    """The demo's fact queries and its held-out question-form queries, 64 in all."""
    if not path.is_file():
        path.write_text(demo.queries_path.read_text() + demo.finetune_queries_path.read_text())
    return path


class StageResults:
    """Each stage's result, kept as JSON under the output directory once it has run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.directory / "stages" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        write_json_atomically(path, result)
        return result


def floor_seconds(model: ModelSettings, data: DataSettings) -> float:
    """One plain forward+backward pass of ``log p(z)`` over the corpus, batched as the sketch pass is."""
    loaded, tokenizer = load_model(str(model.path), device="cpu")
    step = plain_forward_backward(loaded)
    documents = iter_documents(list_shards(str(data.path)), "id", "text", on_skip=lambda skip: None)
    started = time.perf_counter()
    for batch in batch_documents(tokenizer, documents, data.batch_size, data.max_length, on_skip=lambda skip: None):
        step(batch)
    return time.perf_counter() - started


def recall(truth: dict[str, list[str]], found: dict[str, list[str]]) -> float:
    """Mean over queries of ``|T & F| / min(|T|, |F|)``: the share of the true top documents T among
    those found F, out of as many as F can hold (M documents cannot hold a true top 100 when M < 100)."""
    shares = [len(set(top) & set(found.get(query, []))) / min(len(top), len(found.get(query, [])) or 1)
              for query, top in truth.items() if top]
    return sum(shares) / len(shares)


def run_sketch_recall(settings: SketchRecallSettings, demo: DemoPaths, output_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    torch.set_num_threads(1)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = StageResults(output_dir)
    model = ModelSettings(path=str(demo.model_dir), device="cpu")
    fit_data = DataSettings(path=str(demo.corpus_dir))
    factors = FactorSettings(path=str(output_dir / "factors"))
    if fitted_for(output_dir / "factors", fit_request(model, fit_data, factors)) is None:
        run_fit(model, fit_data, factors, output_dir, {}, progress=False)
    queries = QuerySettings(path=str(benchmark_queries(demo, output_dir / "queries.jsonl")))
    corpora = {"demo": demo.corpus_dir,
               "large": recombined_corpus(demo.corpus_dir, output_dir / "large-corpus", settings.documents, settings.shards,
                                          settings.seed)}
    score = ScoreSettings(rank=settings.rank, top_k=settings.top, query_batch_size=64, token_scores=False, progress=False)
    results: dict[str, Any] = {}
    for name, corpus in corpora.items():
        data = DataSettings(path=str(corpus))
        work = output_dir / name

        def full_pass() -> dict[str, Any]:
            summary = run_score(model, data, factors, queries, score, work / "exact", {})
            top = {query: [row.doc_id for row in rows] for query, rows in read_ranked(summary.scores_path).items()}
            return {"seconds": summary.seconds, "documents": summary.counts["documents_scored"], "top": top}

        truth = stage(f"{name}-truth", full_pass)
        log(f"{name}: full pass over {truth['documents']} documents in {truth['seconds']:.0f} s")
        floor = stage(f"{name}-floor", lambda: {"seconds": floor_seconds(model, data)})
        sizes = {fraction: max(1, round(fraction * truth["documents"])) for fraction in settings.fractions}
        rows = []
        sketches = [(k, None, 16) for k in settings.sketch_dims] + \
            [(settings.component_sketch_dim, c, bits) for c, bits in settings.compressed]
        for k, components, bits in sketches:
            rows.append(stage(f"{name}-{_sketch_name(k, components, bits)}", lambda: _gradient_row(
                k, components, bits, model, data, factors, queries, score, work, sizes, truth, floor["seconds"])))
            log(f"{name}: {rows[-1]['method']}: {rows[-1]['recall']}")
        kinds = ["bm25"] + (["dense"] if truth["documents"] <= settings.dense_max_documents else [])
        for kind in kinds:
            rows.append(stage(f"{name}-{kind}", lambda: _text_row(kind, data, queries, work, sizes, truth)))
            log(f"{name}: {kind}: {rows[-1]['recall']}")
        cost_sketch = _sketch_name(settings.cost_sketch_dim, settings.cost_components, settings.cost_bits)
        costs = [stage(f"{name}-cost-{cost_sketch}-{fraction}",
                       lambda: _cost(settings.cost_sketch_dim, settings.cost_components, settings.cost_bits, fraction, model,
                                     data, factors, queries, score, work, truth))
                 for fraction in settings.cost_fractions]
        kept = stage(f"{name}-kept-{cost_sketch}", lambda: _kept_sketches(
            settings.cost_sketch_dim, settings.cost_components, settings.cost_bits, model, data, factors, queries, score, work))
        results[name] = {"documents": truth["documents"], "full_pass_seconds": truth["seconds"],
                         "floor_seconds": floor["seconds"], "rows": rows, "costs": costs, "kept_sketches": kept}
    write_json_atomically(output_dir / "sketch_benchmark.json", results)
    return results


def _sketch_name(k: int, components: int | None, bits: int) -> str:
    return f"gradient-k{k}" + (f"-c{components}" if components is not None else "") + (f"-b{bits}" if bits != 16 else "")


def _method(k: int, components: int | None, bits: int) -> str:
    return f"gradient k={k}" + (f", C={components}" if components is not None else "") + (f", {bits}-bit" if bits != 16 else "")


def _gradient_row(k: int, components: int | None, bits: int, model: ModelSettings, data: DataSettings,
                  factors: FactorSettings, queries: QuerySettings, score: ScoreSettings, work: Path, sizes: dict[float, int],
                  truth: dict[str, Any], floor: float) -> dict[str, Any]:
    directory = work / _sketch_name(k, components, bits)
    prefilter = PrefilterSettings(kind="gradient", path=str(directory), sketch_dim=k, sketch_components=components,
                                  sketch_bits=bits)
    built = update_index(directory, prefilter, data, list_shards(str(data.path)), lambda skip: None, model,
                         Path(str(factors.path)))
    inputs = ScoreInputs(model, data, factors, queries, score, prefilter=prefilter)
    index = open_index(directory, prefilter)
    query_list = read_queries(str(queries.path), on_skip=lambda skip: None)
    started = time.perf_counter()
    sketches = query_sketcher(inputs, directory, index.manifest, work)(query_list)
    query_seconds = time.perf_counter() - started
    started = time.perf_counter()
    hits = index.search(sketches, [query.id for query in query_list], max(sizes.values()))
    search_seconds = time.perf_counter() - started
    modules = index.manifest.encoder["modules"]
    layers = len({name.split(".layers.")[-1].split(".")[0] for name in modules})
    return {
        "method": _method(k, components, bits),
        "recall": {str(fraction): recall(truth["top"], {q.id: [h.doc_id for h in found[:m]] for q, found in zip(query_list, hits)})
                   for fraction, m in sizes.items()},
        "bytes_per_document_per_layer": bits / 8 * (components or k * k) * len(modules) / layers,
        "build_seconds": built.seconds,
        "build_over_floor": built.seconds / floor,
        "query_side_seconds": query_seconds,
        "search_seconds": search_seconds,
    }


def _text_row(kind: str, data: DataSettings, queries: QuerySettings, work: Path, sizes: dict[float, int],
              truth: dict[str, Any]) -> dict[str, Any]:
    prefilter = PrefilterSettings(kind=kind, path=str(work / kind))
    built = update_index(work / kind, prefilter, data, list_shards(str(data.path)), lambda skip: None)
    query_list = read_queries(str(queries.path), on_skip=lambda skip: None)
    hits = search(open_index(work / kind, prefilter), query_list, max(sizes.values()))
    return {
        "method": kind,
        "recall": {str(fraction): recall(truth["top"], {q.id: [h.doc_id for h in found[:m]] for q, found in zip(query_list, hits)})
                   for fraction, m in sizes.items()},
        "build_seconds": built.seconds,
    }


def _cost(k: int, components: int | None, bits: int, fraction: float, model: ModelSettings, data: DataSettings,
          factors: FactorSettings, queries: QuerySettings, score: ScoreSettings, work: Path,
          truth: dict[str, Any]) -> dict[str, Any]:
    """A new batch of queries through the index, end to end, against the full pass."""
    m = max(1, round(fraction * truth["documents"]))
    directory = work / _sketch_name(k, components, bits)
    prefilter = PrefilterSettings(kind="gradient", path=str(directory), sketch_dim=k, sketch_components=components,
                                  sketch_bits=bits, top_m=m)
    # Built by the recall stage; built again here if that stage's result was kept but not its index.
    update_index(directory, prefilter, data, list_shards(str(data.path)), lambda skip: None, model, Path(str(factors.path)))
    started = time.perf_counter()
    summary = run_score(model, data, factors, queries, score, work / f"through-index-{m}", {}, prefilter_settings=prefilter)
    seconds = time.perf_counter() - started
    found = {query: [row.doc_id for row in rows] for query, rows in read_ranked(summary.scores_path).items()}
    return {"top_m": m, "sketch_dim": k, "components": components, "bits": bits, "seconds": seconds,
            "full_pass_seconds": truth["seconds"], "speedup": truth["seconds"] / seconds,
            "documents_scored": summary.counts["documents_scored"], "recall_of_true_top": recall(truth["top"], found)}


def _kept_sketches(k: int, components: int | None, bits: int, model: ModelSettings, data: DataSettings,
                   factors: FactorSettings, queries: QuerySettings, score: ScoreSettings, work: Path) -> dict[str, Any]:
    """The full pass with ``score.keep_sketches`` against the same pass without, one after the other; the
    index is created (its sample sketched, basis and codes fitted) before the pass and timed apart."""
    prefilter = PrefilterSettings(path=str(work / f"kept-{_sketch_name(k, components, bits)}"), sketch_dim=k,
                                  sketch_components=components, sketch_bits=bits)
    plain = run_score(model, data, factors, queries, score, work / "pass-without-sketches", {})
    kept = run_score(model, data, factors, queries, replace(score, keep_sketches=True), work / "pass-keeping-sketches", {},
                     prefilter_settings=prefilter)
    timings = json.loads(kept.run_record.read_text())["timings"]
    creation = timings.pop("sketch index")
    return {"sketch_dim": k, "components": components, "bits": bits, "plain_seconds": plain.seconds,
            "kept_seconds": sum(timings.values()), "index_creation_seconds": creation,
            "overhead": sum(timings.values()) / plain.seconds - 1}


def format_results(results: dict[str, Any], settings: SketchRecallSettings) -> str:
    lines = []
    for name, result in results.items():
        lines.append(f"{name}: {result['documents']} documents; full pass {result['full_pass_seconds']:.0f} s, "
                     f"plain forward+backward {result['floor_seconds']:.0f} s")
        header = "| method | " + " | ".join(f"recall@{f:.0%}" for f in settings.fractions) + " | bytes/doc/layer | build / floor |"
        lines += [header, "|---|" + "---:|" * (len(settings.fractions) + 2)]
        for row in result["rows"]:
            cells = [f"{row['recall'][str(f)]:.3f}" for f in settings.fractions]
            size = f"{row['bytes_per_document_per_layer']:.0f}" if "bytes_per_document_per_layer" in row else "-"
            ratio = f"{row['build_over_floor']:.2f}" if "build_over_floor" in row else "-"
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {size} | {ratio} |")
        for cost in result["costs"]:
            sketch = _method(cost["sketch_dim"], cost.get("components"), cost.get("bits", 16)).removeprefix("gradient ")
            lines.append(f"64 queries through the index ({sketch}, each query's top {cost['top_m']} scored "
                         f"exactly, {cost['documents_scored']} distinct documents): {cost['seconds']:.0f} s against "
                         f"{cost['full_pass_seconds']:.0f} s for the full pass ({cost['speedup']:.1f}x), finding "
                         f"{cost['recall_of_true_top']:.3f} of the true top documents")
        kept = result["kept_sketches"]
        lines.append(f"The full pass keeping sketches ({_method(kept['sketch_dim'], kept.get('components'), kept['bits'])}): "
                     f"{kept['kept_seconds']:.0f} s against {kept['plain_seconds']:.0f} s without "
                     f"({kept['overhead']:+.1%}); creating the index first took {kept['index_creation_seconds']:.0f} s")
        lines.append("")
    return "\n".join(lines)
