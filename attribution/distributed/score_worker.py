"""The long-lived Ray actor of the scoring pool."""

from __future__ import annotations


import ray

from attribution.distributed.cluster import peak_memory_mib, prepare_worker_process
from attribution.models import find_tracked_modules, load_model
from attribution.prefilter.candidates import Candidates
from attribution.scoring.markers import UnitResult, WorkUnit
from attribution.scoring.query_factors import QueryFactors
from attribution.scoring.shards import ShardScorer
from attribution.settings import DataSettings, ModelSettings, ScoreSettings, resolve_device, torch_dtype


@ray.remote
class ScoreWorker:
    """Loads the candidate model and the query factors once, then scores unit after unit."""

    def __init__(
        self,
        model: ModelSettings,
        tracked_pattern: str,
        query_sets: list[QueryFactors],
        data: DataSettings,
        score: ScoreSettings,
        candidates: Candidates | None,
    ) -> None:
        prepare_worker_process()
        lm, tokenizer = load_model(model.path, model.trust_remote_code, torch_dtype(model.dtype), resolve_device(model.device))
        tracked = find_tracked_modules(lm, tracked_pattern)
        self.scorer = ShardScorer(lm, tokenizer, tracked, query_sets, data, score, candidates)

    def run(self, unit: WorkUnit) -> UnitResult:
        return self.scorer.run(unit)

    def peak_memory_mib(self) -> float:
        return peak_memory_mib()
