"""Fit factors, score, and summarise: the whole job in one call."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from attribution.data.corpus import list_shards
from attribution.data.queries import read_queries
from attribution.fitting import FitSummary, run_fit
from attribution.prefilter.index import run_build_index
from attribution.report.top_documents import document_texts, format_top_documents
from attribution.scoring.run import ScoreSummary, run_score
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
)


def run_pipeline(
    model: ModelSettings,
    data: DataSettings,
    factors: FactorSettings,
    queries: QuerySettings,
    score: ScoreSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    show_top: int = 3,
    progress: bool = True,
    prefilter: PrefilterSettings = PrefilterSettings(),
    cluster: ClusterSettings = ClusterSettings(num_workers=0),
    refine: RefineSettings = RefineSettings(),
) -> tuple[FitSummary | None, ScoreSummary, str]:
    """Fit the store (unless the strategy is the identity), build or extend the prefilter index (if any),
    score, and format the top documents."""
    output_dir = Path(output_dir)
    fit_summary = None
    if factors.strategy != "identity":
        fit_summary = run_fit(model, data, factors, output_dir, config, progress, cluster)
        factors = replace(factors, path=str(fit_summary.factors_path))
    if prefilter.kind != "none":
        run_build_index(prefilter, data, output_dir, config)
    score_summary = run_score(model, data, factors, queries, score, output_dir, config, prefilter_settings=prefilter,
                              cluster=cluster, refine_settings=refine)
    shown = {row.doc_id for rows in score_summary.top.values() for row in rows[:show_top]}
    texts = document_texts(shown, list_shards(data.path), data.id_field, data.text_field)
    report = format_top_documents(read_queries(queries.path, on_skip=lambda skip: None), score_summary.top, texts, show_top)
    return fit_summary, score_summary, report
