"""Completion markers: the result of each finished (query batch, shard) unit, kept until the run ends.

A unit's marker is a Parquet file of its top and bottom rows, with its skips and counts in
the schema metadata, written atomically. A rerun with the same inputs and settings finds the
markers under the same run key, skips those units, and merges their rows instead: a crashed
run resumes without scoring a shard twice or writing a row twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import Skip
from attribution.runs import write_json_atomically
from attribution.scoring.tables import write_part
from attribution.scoring.topk import Ranked

MARKER_SCHEMA = pa.schema(
    [
        ("direction", pa.string()),
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("layer_scores", pa.list_(pa.float64())),
        ("shard", pa.string()),
    ]
)


@dataclass(frozen=True)
class WorkUnit:
    query_batch: int
    shard: str


@dataclass
class UnitResult:
    unit: WorkUnit
    positive: list[Ranked] = field(default_factory=list)
    negative: list[Ranked] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    documents_scored: int = 0


def file_fingerprint(path: str | Path) -> str:
    """Identity of a shard's content as far as the file system tells: path, size, mtime."""
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def run_key(inputs: dict[str, Any]) -> str:
    """A hash of everything that determines a run's rows (fingerprints, settings, files)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


class MarkerStore:
    """The markers of one run key, under ``<output_dir>/.work/<run_key>/``."""

    def __init__(self, output_dir: str | Path, key: str) -> None:
        self.directory = Path(output_dir) / ".work" / key

    def _name(self, unit: WorkUnit) -> str:
        return f"qb{unit.query_batch:05d}-{Path(unit.shard).stem}-{file_fingerprint(unit.shard)}"

    def done(self, unit: WorkUnit) -> bool:
        return (self.directory / f"{self._name(unit)}.parquet").is_file()

    def write(self, result: UnitResult) -> None:
        rows = [("positive", r) for r in result.positive] + [("negative", r) for r in result.negative]
        table = pa.Table.from_pydict(
            {
                "direction": [d for d, _ in rows],
                "query_id": [r.query_id for _, r in rows],
                "rank": [r.rank for _, r in rows],
                "doc_id": [r.doc_id for _, r in rows],
                "score": [r.score for _, r in rows],
                "layer_scores": [np.asarray(r.layer_scores, dtype=np.float64) for _, r in rows],
                "shard": [r.shard for _, r in rows],
            },
            schema=MARKER_SCHEMA,
        )
        metadata = {"skips": [asdict(s) for s in result.skips], "documents_scored": result.documents_scored}
        table = table.replace_schema_metadata({"unit": json.dumps(metadata)})
        write_part(table, self.directory, self._name(result.unit))

    def read(self, unit: WorkUnit) -> UnitResult:
        table = pq.read_table(self.directory / f"{self._name(unit)}.parquet")
        metadata = json.loads(table.schema.metadata[b"unit"])
        result = UnitResult(unit, skips=[Skip(**s) for s in metadata["skips"]], documents_scored=metadata["documents_scored"])
        for row in table.to_pylist():
            ranked = Ranked(row["query_id"], row["rank"], row["doc_id"], row["shard"], row["score"], np.asarray(row["layer_scores"]))
            (result.positive if row["direction"] == "positive" else result.negative).append(ranked)
        return result

    def complete(self) -> Path | None:
        """The run record of the run that finished this key, if one did."""
        path = self.directory / "complete.json"
        return Path(json.loads(path.read_text())["run_record"]) if path.is_file() else None

    def mark_complete(self, run_record: Path) -> None:
        write_json_atomically(self.directory / "complete.json", {"run_record": str(run_record)})
