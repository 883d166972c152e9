"""The work directory of one score run key: query factors, unit results and completion markers.

``<output_dir>/.work/<run key>/`` holds, until the run ends:

- ``queries/qb<i>.safetensors``: query batch i's factors (:mod:`attribution.scoring.query_files`);
- ``units/<unit>.parquet``: a finished (pass, shard) unit's kept rows, with its skips and counts
  in the schema metadata; its existence is the unit's completion marker, written last;
- ``tokens/<unit>.parquet``: the token scores of that unit's top rows;
- ``pairs/query_batch=<i>/<unit>.parquet``: with ``score.top_k=all``, every pair of the unit;
- ``run.lock`` while a run holds the key, ``complete.json`` once the tables are written.

Every file is written atomically, so a rerun with the same inputs and settings finds the
finished pieces under the same key and does only what is left: a crashed run resumes without
computing a query batch or scoring a shard twice, and without writing a row twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import Skip
from attribution.runs import write_json_atomically
from attribution.scoring.tables import write_part


@dataclass(frozen=True, order=True)
class WorkUnit:
    """One pass's query batches against one shard; ``shard_index`` is the shard's position in the run."""

    group: int
    shard_index: int
    shard: str


@dataclass
class UnitOutcome:
    """What a unit did besides its rows: documents and pairs scored, skips, (with a prefilter)
    the ids it scored, to count distinct documents, and the contraction used per module."""

    documents_scored: int = 0
    pairs_scored: int = 0
    skips: list[Skip] = field(default_factory=list)
    scored_ids: list[str] | None = None
    contraction_plan: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # Of which in the forward and backward passes (the rest is reading, ranking and writing).
    forward_backward_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "skips": [asdict(s) for s in self.skips]})

    @classmethod
    def from_json(cls, text: str | bytes) -> UnitOutcome:
        raw = json.loads(text)
        return cls(**{**raw, "skips": [Skip(**s) for s in raw["skips"]]})


def file_fingerprint(path: str | Path) -> str:
    """Identity of a shard's content as far as the file system tells: path, size, mtime."""
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def run_key(inputs: dict[str, Any]) -> str:
    """A hash of everything that determines a run's rows (fingerprints, settings, files)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


class MarkerStore:
    """The files of one run key, under ``<output_dir>/.work/<run_key>/``."""

    def __init__(self, output_dir: str | Path, key: str) -> None:
        self.key = key
        self.directory = Path(output_dir) / ".work" / key

    def unit_name(self, unit: WorkUnit) -> str:
        return f"g{unit.group:05d}-{unit.shard_index:05d}-{Path(unit.shard).stem}-{file_fingerprint(unit.shard)}"

    @property
    def lock_path(self) -> Path:
        return self.directory / "run.lock"

    @property
    def pairs_directory(self) -> Path:
        return self.directory / "pairs"

    def query_batch_path(self, index: int) -> Path:
        return self.directory / "queries" / f"qb{index:05d}.safetensors"

    def pairs_path(self, query_batch: int, unit: WorkUnit) -> Path:
        return self.pairs_directory / f"query_batch={query_batch}" / f"{self.unit_name(unit)}.parquet"

    def tokens_path(self, unit: WorkUnit) -> Path:
        return self.directory / "tokens" / f"{self.unit_name(unit)}.parquet"

    def _unit_path(self, unit: WorkUnit) -> Path:
        return self.directory / "units" / f"{self.unit_name(unit)}.parquet"

    def done(self, unit: WorkUnit) -> bool:
        return self._unit_path(unit).is_file()

    def write(self, unit: WorkUnit, rows: pa.Table, outcome: UnitOutcome) -> None:
        """The unit's completion marker: its kept rows, with its outcome in the metadata."""
        write_part(rows.replace_schema_metadata({"unit": outcome.to_json()}), self.directory / "units", self.unit_name(unit))

    def rows(self, unit: WorkUnit) -> pa.Table:
        return pq.read_table(self._unit_path(unit))

    def outcome(self, unit: WorkUnit) -> UnitOutcome:
        return UnitOutcome.from_json(pq.read_schema(self._unit_path(unit)).metadata[b"unit"])

    def complete(self) -> Path | None:
        """The run record of the run that finished this key, if one did."""
        path = self.directory / "complete.json"
        return Path(json.loads(path.read_text())["run_record"]) if path.is_file() else None

    def mark_complete(self, run_record: Path) -> None:
        write_json_atomically(self.directory / "complete.json", {"run_record": str(run_record)})
