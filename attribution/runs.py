"""Run records: ``runs/<run_id>.json`` beside every output, written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attribution import __version__
from attribution.data.corpus import Skip


def new_run_id(job: str) -> str:
    """Sortable by start time, unique across concurrent runs."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{job}-{uuid.uuid4().hex[:6]}"


def git_revision() -> str | None:
    """The library's git revision, when it runs from a checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return result.stdout.strip() or None


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(staging, path)


@dataclass
class RunRecord:
    """What a run did: resolved config, fingerprints, counts, timings and every skip with why."""

    job: str
    config: dict[str, Any]
    run_id: str = ""
    library_version: str = __version__
    git_revision: str | None = field(default_factory=git_revision)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    fingerprints: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skips: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or new_run_id(self.job)
        self._clock = time.perf_counter()

    def skip(self, skip: Skip) -> None:
        self.skips.append(asdict(skip))

    def lap(self, name: str) -> float:
        """Seconds since the previous lap (or the start), recorded under ``name``."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 3)
        self._clock = now
        return self.timings[name]

    def write(self, output_dir: str | Path) -> Path:
        """``<output_dir>/runs/<run_id>.json``, its outputs as absolute paths: a job run from
        another directory (``attribution-report output_dir=/abs/run``) still finds them."""
        path = Path(output_dir) / "runs" / f"{self.run_id}.json"
        self.outputs = {name: str(Path(location).absolute()) for name, location in self.outputs.items()}
        write_json_atomically(path, asdict(self))
        return path
