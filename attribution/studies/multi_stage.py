"""Fact tracing on the demo's fine-tuned model: multi-stage vs single-stage vs gradient dot product vs BM25.

The fine-tuned demo model answers questions about facts it saw only in pretraining
documents; each ``finetune_queries.jsonl`` row names the documents that state its fact.
Every method ranks the whole demo corpus for every such query, and the table reports the
mean reciprocal rank of the first true source and the mean Recall@10, per damping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attribution.data.corpus import list_shards
from attribution.data.queries import read_queries
from attribution.demo.train import DemoPaths
from attribution.fitting import run_fit
from attribution.prefilter.index import update_index
from attribution.report.top_documents import recall_at, reciprocal_rank
from attribution.scoring.run import ScoreSummary, run_score
from attribution.settings import (
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    ScoreSettings,
)


@dataclass(frozen=True)
class StudyRow:
    method: str
    damping: str
    mrr: float
    recall_at_10: float
    seconds: float


def fact_tracing(summary: ScoreSummary, queries_path: Path) -> tuple[float, float]:
    """Mean reciprocal rank and mean Recall@10 of the true sources, over queries that name sources."""
    queries = [q for q in read_queries(queries_path, on_skip=lambda skip: None) if q.source_ids and q.id in summary.top]
    mrr = sum(reciprocal_rank(summary.top[q.id], q.source_ids) for q in queries) / len(queries)
    recall = sum(recall_at(summary.top[q.id], q.source_ids, 10) for q in queries) / len(queries)
    return mrr, recall


def run_study(demo: DemoPaths, dampings: list[float | None], output_dir: Path, rank: int | None,
              device: str = "auto", progress: bool = False) -> list[StudyRow]:
    """Fit the three stores once, then score every method at every damping (null = heuristic)."""
    pretrained = ModelSettings(path=str(demo.model_dir), device=device)
    finetuned = ModelSettings(path=str(demo.finetuned_model_dir), device=device)
    corpus = DataSettings(path=str(demo.corpus_dir))
    queries = QuerySettings(path=str(demo.finetune_queries_path))
    score = ScoreSettings(rank=rank, top_k=1_000_000, token_scores=False, progress=progress)
    stores = {
        "pretrained": run_fit(pretrained, corpus, FactorSettings(path=str(output_dir / "stores/pretrained")), output_dir, {}, progress),
        "finetuned_on_finetune_data": run_fit(finetuned, DataSettings(path=str(demo.finetune_path)),
                                              FactorSettings(path=str(output_dir / "stores/finetuned_ft_data")), output_dir, {}, progress),
        "finetuned_on_corpus": run_fit(finetuned, corpus, FactorSettings(path=str(output_dir / "stores/finetuned_corpus")),
                                       output_dir, {}, progress),
    }
    scores = output_dir / "scores"

    def measure(method: str, damping: str, summary: ScoreSummary) -> StudyRow:
        mrr, recall = fact_tracing(summary, Path(queries.path))
        return StudyRow(method, damping, mrr, recall, summary.seconds)

    rows = []
    for damping in dampings:
        label = "heuristic" if damping is None else f"{damping:g}"
        multi = run_score(pretrained, corpus, FactorSettings(path=str(stores["pretrained"].factors_path), damping=damping),
                          queries, score, scores, {},
                          FinetuneSettings(str(demo.finetuned_model_dir), str(stores["finetuned_on_finetune_data"].factors_path), damping))
        rows.append(measure("multi-stage EK-FAC", label, multi))
        single = run_score(finetuned, corpus, FactorSettings(path=str(stores["finetuned_on_corpus"].factors_path), damping=damping),
                           queries, score, scores, {})
        rows.append(measure("single-stage EK-FAC (fine-tuned)", label, single))
    identity = FactorSettings(strategy="identity")
    multi_dot = run_score(pretrained, corpus, identity, queries, score, scores, {},
                          FinetuneSettings(str(demo.finetuned_model_dir), str(stores["finetuned_on_finetune_data"].factors_path)))
    rows.append(measure("multi-stage gradient dot product", "-", multi_dot))
    rows.append(measure("gradient dot product (fine-tuned)", "-", run_score(finetuned, corpus, identity, queries, score, scores, {})))
    bm25 = PrefilterSettings(kind="bm25", path=str(output_dir / "bm25"))
    update_index(bm25.path, bm25, corpus, list_shards(corpus.path), on_skip=lambda skip: None)
    bm25_ranking = run_score(pretrained, corpus, FactorSettings(), queries, ScoreSettings(method="prefilter", top_k=score.top_k),
                             scores, {}, prefilter_settings=bm25)
    rows.append(measure("BM25 (prompt + answer)", "-", bm25_ranking))
    return rows


def format_table(rows: list[StudyRow]) -> str:
    lines = ["| method | damping | MRR | Recall@10 | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.damping} | {r.mrr:.3f} | {r.recall_at_10:.3f} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines)
