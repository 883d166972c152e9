"""Turn a job's Hydra config into the library's typed settings; fill unset paths with the demo."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attribution.demo.train import DemoConfig, DemoPaths, ensure_demo
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


def limit_threads() -> None:
    """One torch thread per process unless the user asked otherwise: extra threads on
    shared cores slow CPU runs down several times."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def demo_paths(cfg: DictConfig) -> DemoPaths:
    return ensure_demo(config=DemoConfig.from_dict(plain(cfg.demo)))


def model_and_data(cfg: DictConfig) -> tuple[ModelSettings, DataSettings]:
    """Model and corpus settings; with no model path, the embedded demo model and corpus."""
    model = from_mapping(ModelSettings, plain(cfg.model), "model")
    data = from_mapping(DataSettings, plain(cfg.data), "data")
    if model.path is None:
        demo = demo_paths(cfg)
        model = replace(model, path=str(demo.model_dir))
        if data.path is None:
            data = replace(data, path=str(demo.corpus_dir))
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


def finetune_settings(cfg: DictConfig) -> FinetuneSettings:
    return from_mapping(FinetuneSettings, plain(cfg.finetune), "finetune")


def prefilter_settings(cfg: DictConfig) -> PrefilterSettings:
    return from_mapping(PrefilterSettings, plain(cfg.prefilter), "prefilter")


def cluster_settings(cfg: DictConfig) -> ClusterSettings:
    return from_mapping(ClusterSettings, plain(cfg.cluster), "cluster")


def refine_settings(cfg: DictConfig) -> RefineSettings:
    return from_mapping(RefineSettings, plain(cfg.refine), "refine")
