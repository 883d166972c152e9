"""Turn a job's Hydra config into the library's typed settings; fill unset paths with the demo
and with what other jobs wrote into the same run directory (``output_dir``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attribution.curvature.store import MANIFEST, FactorStoreError
from attribution.demo.train import DemoConfig, DemoPaths, ensure_demo
from attribution.prefilter.manifest import MANIFEST_NAME, PrefilterError
from attribution.report.settings import ReportSettings
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
    from_mapping,
)


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def prepare_process() -> None:
    """One torch thread per process unless the user asked otherwise (extra threads on shared
    cores slow CPU runs down several times), and no weight-loading bars on the terminal."""
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    transformers_logging.disable_progress_bar()


def demo_paths(cfg: DictConfig) -> DemoPaths:
    return ensure_demo(config=DemoConfig.from_dict(plain(cfg.demo)))


def model_and_data(cfg: DictConfig, stages: str = "fit and score") -> tuple[ModelSettings, DataSettings]:
    """Model and corpus settings; with no model path, the embedded demo model and corpus. With
    ``model.memory_gib``, the micro-batch that keeps the job's ``stages`` (``fit``, ``score`` or
    ``fit and score``) inside it."""
    model = from_mapping(ModelSettings, plain(cfg.model), "model")
    data = from_mapping(DataSettings, plain(cfg.data), "data")
    if model.path is None:
        demo = demo_paths(cfg)
        model = replace(model, path=str(demo.model_dir))
        if data.path is None:
            data = replace(data, path=str(demo.corpus_dir))
    if model.memory_gib is not None:
        from attribution.scale.plan import FIT_STAGES, SCORE_STAGES, within_memory
        from jobs.entry import say

        planned = {"fit": FIT_STAGES, "score": SCORE_STAGES, "fit and score": FIT_STAGES + SCORE_STAGES}[stages]
        data, line = within_memory(model, data, score_settings(cfg) if "score" in cfg else ScoreSettings(), planned)
        if line:
            say(line)
    return model, data


def query_settings(cfg: DictConfig) -> QuerySettings:
    """Queries; with no path and the demo model, the demo queries."""
    queries = from_mapping(QuerySettings, plain(cfg.queries), "queries")
    if queries.path is None and cfg.model.path is None:
        queries = replace(queries, path=str(demo_paths(cfg).queries_path))
    return queries


def score_settings(cfg: DictConfig) -> ScoreSettings:
    return from_mapping(ScoreSettings, plain(cfg.score), "score")


def factor_settings(cfg: DictConfig) -> FactorSettings:
    return from_mapping(FactorSettings, plain(cfg.factors), "factors")


def stored_factor_settings(cfg: DictConfig) -> FactorSettings:
    """The factor store a scoring job reads: ``factors.path``, or by default the one that
    ``fit_factors`` and ``pipeline`` write into the same ``output_dir``; it must exist.

    With ``factors.strategy=identity`` (the gradient dot product) no store is read.
    """
    settings = factor_settings(cfg)
    if settings.strategy == "identity":
        return settings
    path = Path(settings.path) if settings.path is not None else Path(cfg.output_dir) / "factors"
    require_store(path, "factors.path", f"python -m jobs.fit_factors output_dir={cfg.output_dir}")
    return replace(settings, path=str(path))


def require_store(path: Path, key: str, fit_command: str) -> None:
    """A missing store is a user error that names the key to set and the command that writes it."""
    if not (path / MANIFEST).is_file():
        raise FactorStoreError(
            f"{key}={path}: no factor store there (no {MANIFEST}); fit one with `{fit_command}`, or set {key}"
        )


def finetune_settings(cfg: DictConfig) -> FinetuneSettings:
    settings = from_mapping(FinetuneSettings, plain(cfg.finetune), "finetune")
    if settings.enabled and cfg.factors.strategy != "identity":
        require_store(Path(settings.factors_path), "finetune.factors_path",
                      "python -m jobs.fit_factors model.path=FINETUNED_MODEL data.path=FINETUNING_DATA factors.path=STORE")
    return settings


def prefilter_settings(cfg: DictConfig) -> PrefilterSettings:
    return from_mapping(PrefilterSettings, plain(cfg.prefilter), "prefilter")


def built_prefilter_settings(cfg: DictConfig) -> PrefilterSettings:
    """The prefilter a score job searches: ``prefilter.path``, or by default the index that
    ``build_index`` and ``pipeline`` write into the same ``output_dir``; it must exist."""
    settings = prefilter_settings(cfg)
    if settings.kind == "none":
        return settings
    path = settings.index_path(cfg.output_dir)
    if not (path / MANIFEST_NAME).is_file():
        raise PrefilterError(
            f"prefilter.path={path}: no {settings.kind} index there; build one with "
            f"`python -m jobs.build_index prefilter.kind={settings.kind} output_dir={cfg.output_dir}`, or set prefilter.path"
        )
    return replace(settings, path=str(path))


def cluster_settings(cfg: DictConfig) -> ClusterSettings:
    return from_mapping(ClusterSettings, plain(cfg.cluster), "cluster")


def refine_settings(cfg: DictConfig, model: ModelSettings, data: DataSettings) -> RefineSettings:
    """``refine.*``; with ``model.memory_gib``, the query columns solved together (or, for ``auto``, the closed
    form) that keep the refinement inside it."""
    refine = from_mapping(RefineSettings, plain(cfg.refine), "refine")
    if model.memory_gib is not None:
        from attribution.scale.plan import refine_within_memory
        from jobs.entry import say

        # The pipeline has no fine-tuned stage; score and sweep do when finetune.model_path is set.
        stages = 2 if cfg.get("finetune") is not None and cfg.finetune.model_path is not None else 1
        refine, line = refine_within_memory(model, data, score_settings(cfg), refine, cfg.factors.strategy,
                                            cluster_settings(cfg).sharded, stages)
        if line:
            say(line)
    return refine


def report_settings(cfg: DictConfig) -> ReportSettings:
    return from_mapping(ReportSettings, plain(cfg.report), "report")
