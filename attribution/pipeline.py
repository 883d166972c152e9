"""Fit factors, score, and summarise: the whole job in one call."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from attribution.data.corpus import list_shards
from attribution.data.queries import read_queries
from attribution.fitting import fit_request, fitted_for, run_fit
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
    SettingsError,
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
    refit: bool = False,
) -> tuple[str | None, ScoreSummary, str]:
    """Fit the store (unless the strategy is the identity, or ``refit`` is false and the store was
    fitted from the same model, corpus files and settings), build or extend the prefilter index (if
    any), score, and format the top documents. The fit line says which it was."""
    if score.all_pairs:
        raise SettingsError("score.top_k=all: the pipeline ends in a report, which shows each query's ranking, and an "
                            "all-pairs run writes every pair unranked; run `python -m jobs.score score.top_k=all` for "
                            "the pairs, or give the pipeline a number of rows (score.top_k=100)")
    output_dir = Path(output_dir)
    fit_line = None
    if factors.strategy != "identity":
        target = factors.store_path(output_dir)
        stored = None if refit else fitted_for(target, fit_request(model, data, factors))
        if stored is None:
            fitted = run_fit(model, data, factors, output_dir, config, progress, cluster)
            target, fit_line = fitted.factors_path, fitted.line()
        else:
            fit_line = (f"reused the factor store {target}, fitted {stored.created} on {stored.num_sequences} sequences "
                        f"from the same model, corpus files and settings (refit=true fits it again)")
        factors = replace(factors, path=str(target))
    if prefilter.kind != "none":
        store = factors.store_path(output_dir)
        run_build_index(prefilter, data, output_dir, config, model, store)
    score_summary = run_score(model, data, factors, queries, score, output_dir, config, prefilter_settings=prefilter,
                              cluster=cluster, refine_settings=refine)
    shown = {row.doc_id for rows in score_summary.top.values() for row in rows[:show_top]}
    texts = document_texts(shown, list_shards(data.path), data.id_field, data.text_field)
    report = format_top_documents(read_queries(queries.path, on_skip=lambda skip: None), score_summary.top, texts, show_top)
    return fit_line, score_summary, report
