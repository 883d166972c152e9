"""One query batch's factors as a safetensors file: computed once, read by every unit that needs them.

``<work dir>/queries/qb<index>.safetensors`` holds ``<module>.left`` (Q, d_out, r) and
``<module>.right`` (Q, d_in', r) for the batch's kept queries; its metadata holds their ids,
the rejected ids and the per-query diagnostics (JSON). The header alone tells the driver
which queries a batch kept, without loading a tensor. Written atomically, so a file that
exists is complete, and a resumed run does not compute it again.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from attribution.scoring.query_factors import ModuleQueryFactors, QueryFactors
from attribution.scoring.stages import QueryBatchFactors


@dataclass(frozen=True)
class QueryBatchHeader:
    """What a query batch file says about its queries."""

    query_ids: list[str]
    rejected: list[str]
    diagnostics: list[dict]
    batch_ids: list[str]
    seconds: float

    def diagnostics_by_query(self) -> dict[str, list[dict]]:
        """Each query's diagnostics, one per stage in the order they were applied, keyed by its id."""
        grouped: dict[str, list[dict]] = {}
        for diagnostic in self.diagnostics:
            grouped.setdefault(diagnostic["query_id"], []).append(diagnostic)
        return grouped


def save_query_batch(path: str | Path, prepared: QueryBatchFactors, batch_ids: list[str], seconds: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    factors = prepared.factors
    tensors = {}
    for name, module in factors.modules.items():
        tensors[f"{name}.left"] = module.left.detach().to("cpu").contiguous()
        tensors[f"{name}.right"] = module.right.detach().to("cpu").contiguous()
    metadata = {
        "query_ids": json.dumps(factors.query_ids),
        "rejected": json.dumps(prepared.rejected),
        "diagnostics": json.dumps(prepared.diagnostics, default=str),
        "modules": json.dumps(list(factors.modules)),
        "batch_ids": json.dumps(batch_ids),
        "seconds": json.dumps(seconds),
    }
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file(tensors, staging, metadata=metadata)
    os.replace(staging, path)


def read_query_header(path: str | Path) -> QueryBatchHeader:
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    return QueryBatchHeader(*(json.loads(metadata[name]) for name in
                              ("query_ids", "rejected", "diagnostics", "batch_ids", "seconds")))


def load_query_factors(path: str | Path) -> QueryFactors:
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        modules = {
            name: ModuleQueryFactors(file.get_tensor(f"{name}.left"), file.get_tensor(f"{name}.right"))
            for name in json.loads(metadata["modules"])
        }
    return QueryFactors(json.loads(metadata["query_ids"]), modules)


