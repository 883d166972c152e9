"""What a score run is given (its settings, as one bundle) and what identifies its stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from attribution.scoring.stages import Stages
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
    SettingsError,
)


@dataclass(frozen=True)
class ScoreInputs:
    """Every setting of a score run; what the driver sends each worker."""

    model: ModelSettings
    data: DataSettings
    factors: FactorSettings
    queries: QuerySettings
    score: ScoreSettings
    finetune: FinetuneSettings = FinetuneSettings()
    prefilter: PrefilterSettings = PrefilterSettings()
    cluster: ClusterSettings = ClusterSettings(num_workers=0)
    refine: RefineSettings = RefineSettings()

    def __post_init__(self) -> None:
        # The one place refine.method=auto becomes what runs, so the run record and its key hold that.
        object.__setattr__(self, "refine", self.refine.resolved(self.factors.strategy, self.cluster.sharded))
        if self.cluster.sharded and self.refine.enabled:
            # The refinement's Gauss-Newton products differentiate with respect to the parameters
            # themselves, which a sharded worker holds only in part.
            raise SettingsError(f"refine.method={self.refine.method} with cluster.sharding={self.cluster.sharding}: the "
                                "refinement needs the whole model in each worker; set cluster.sharding=none or refine.method=none")
        if self.score.keep_sketches and self.prefilter.kind != "none":
            raise SettingsError(f"score.keep_sketches=true keeps the sketches a pass over every document computes, and with "
                                f"prefilter.kind={self.prefilter.kind} this run scores only each query's candidates: set "
                                "prefilter.kind=none, or build the index with jobs.build_index prefilter.kind=gradient")
        if self.score.keep_sketches and self.cluster.sharded:
            raise SettingsError(f"score.keep_sketches=true with cluster.sharding={self.cluster.sharding}: a sharded run "
                                "cannot keep sketches yet; build the index with jobs.build_index prefilter.kind=gradient")

    def resolved(self) -> dict[str, Any]:
        """The settings as the run record keeps them."""
        return {name: asdict(getattr(self, name)) for name in
                ("model", "data", "factors", "queries", "finetune", "score", "prefilter", "refine", "cluster")}


@dataclass(frozen=True)
class StageIdentity:
    """What the run key and the run record need to know of the loaded stages (JSON-able)."""

    method: str
    fingerprints: dict[str, str]
    modules: list[str]
    damping: dict[str, dict[str, float]]
    excluded_modules: list[dict[str, str]] = field(default_factory=list)
    # Per refined stage, the sample it is refined on (path, sequences, skips).
    refinement: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, stages: Stages) -> StageIdentity:
        return cls(stages.method, dict(stages.fingerprints), [m.name for m in stages.tracked], stages.damping,
                   list(stages.excluded_modules), dict(stages.refinement))
