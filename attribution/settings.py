"""Typed settings that jobs build from their Hydra config; the library reads only these.

Each dataclass mirrors one group under ``conf/`` field for field, so an unknown or
misspelt key fails loudly in :func:`from_mapping` instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from attribution.errors import UserError

T = TypeVar("T")


class SettingsError(UserError, ValueError):
    """A configuration value that the library cannot use."""


def from_mapping(kind: type[T], values: Mapping[str, Any], group: str) -> T:
    """Build ``kind`` from a config group, naming the group in every error."""
    names = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise SettingsError(f"unknown key(s) in {group}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return kind(**dict(values))


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SettingsError(f"{name!r} is not a torch floating-point dtype (float32, float64, bfloat16, ...)")
    return dtype


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ModelSettings:
    path: str | None = None
    tracked_modules: str = "all"
    trust_remote_code: bool = False
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class DataSettings:
    path: str | None = None
    id_field: str = "id"
    text_field: str = "text"
    max_length: int = 128
    batch_size: int = 8


@dataclass(frozen=True)
class FactorSettings:
    path: str | None = None
    strategy: str = "ekfac"
    fisher: bool | str = True
    damping: float | None = None
    max_sequences: int | None = None
    dtype: str = "float32"
    seed: int = 0


@dataclass(frozen=True)
class FinetuneSettings:
    """Set both paths for multi-stage scoring; ``damping`` is the fine-tuned stage's (null = heuristic)."""

    model_path: str | None = None
    factors_path: str | None = None
    damping: float | None = None

    @property
    def enabled(self) -> bool:
        if (self.model_path is None) != (self.factors_path is None):
            raise SettingsError("multi-stage scoring needs both finetune.model_path and finetune.factors_path")
        return self.model_path is not None


@dataclass(frozen=True)
class QuerySettings:
    path: str | None = None


@dataclass(frozen=True)
class ScoreSettings:
    rank: int | None = 32
    top_k: int = 10
    bottom_k: int = 0
    query_batch_size: int = 16
    token_scores: bool = True
    dtype: str = "float32"
    progress: bool = True
    # influence: I(q, z) on every document (or the prefilter's candidates); prefilter: the
    # prefilter's own ranking as the score table (method column = prefilter.kind), for comparison.
    method: str = "influence"

    def __post_init__(self) -> None:
        if self.method not in ("influence", "prefilter"):
            raise SettingsError(f"score.method={self.method!r}; expected influence or prefilter")


REFINE_METHODS = ("none", "cg", "stochastic")


@dataclass(frozen=True)
class RefineSettings:
    """Query-side refinement of ``(G + lambda I)^{-1} grad m(q)`` on the true Gauss-Newton matrix of a
    document sample, preconditioned by and started at the closed-form EK-FAC solution; mirrors
    conf/refine/default.yaml. ``data_path`` / ``finetune_data_path``: the pretraining / fine-tuning
    stage's sample (null = the data recorded in that stage's factor store)."""

    method: str = "none"
    steps: int = 20
    batch_size: int = 8
    tolerance: float = 1e-3
    data_path: str | None = None
    finetune_data_path: str | None = None
    max_sequences: int | None = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in REFINE_METHODS:
            raise SettingsError(f"refine.method={self.method!r}; expected one of {', '.join(REFINE_METHODS)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


PREFILTER_KINDS = ("none", "tfidf", "bm25", "dense")
DENSE_INDEX_TYPES = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class PrefilterSettings:
    """Candidate retrieval before influence scoring; mirrors conf/prefilter/default.yaml."""

    kind: str = "none"
    path: str | None = None
    top_m: int = 100
    n_features: int = 2**20
    k1: float = 1.2
    b: float = 0.75
    model: str | None = None
    device: str = "auto"
    index_type: str = "flat"
    nlist: int = 256
    nprobe: int = 16
    train_size: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.kind not in PREFILTER_KINDS:
            raise SettingsError(f"prefilter.kind={self.kind!r}; expected one of {', '.join(PREFILTER_KINDS)}")
        if self.index_type not in DENSE_INDEX_TYPES:
            raise SettingsError(f"prefilter.index_type={self.index_type!r}; expected one of {', '.join(DENSE_INDEX_TYPES)}")
        if self.top_m < 1:
            raise SettingsError(f"prefilter.top_m={self.top_m}; expected a positive number of candidates per query")

    def index_path(self, output_dir: str | Path) -> Path:
        """Where the index lives: ``path``, else ``<output_dir>/prefilter/<kind>``."""
        return Path(self.path) if self.path is not None else Path(output_dir) / "prefilter" / self.kind


@dataclass(frozen=True)
class ClusterSettings:
    """``num_workers=0`` runs in this process without Ray (debugging, notebooks, tests)."""

    address: str | None = None
    num_workers: int = 2
    # Attempts per shard beyond the first, whether the worker raised or died.
    max_retries: int = 2
    # Finish with the shards that did succeed instead of failing the job.
    allow_failed_shards: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Shard the model's parameters over the fit workers (FSDP2) for models too big for one worker.
    shard_model: bool = False

    @property
    def uses_ray(self) -> bool:
        return self.num_workers > 0
