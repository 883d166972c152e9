"""The sweep state: ``<output_dir>/sweep_state.json``, small, plain JSON (no pickle), written atomically.

It records the table's identity (fingerprints), the watermark (the last night committed),
every swept shard with its content fingerprint and the group it was scored in, every live
group with its dated part files, the groups that were replaced and why, and one entry per
night. The state is the commit point of a night: part files not listed in it are not part
of the table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attribution.errors import UserError
from attribution.runs import write_json_atomically
from attribution.sweep.shards import KnownShard

STATE_NAME = "sweep_state.json"
FORMAT_VERSION = 1


class StateError(UserError, ValueError):
    """A state file this library cannot read; the message names it."""


@dataclass
class Group:
    """Shards scored together in one run: their rows are the top-k over all of them."""

    sweep_date: str
    shards: list[str]
    run_id: str
    scores: str  # part file, relative to the output directory
    token_scores: str | None
    rows: int


@dataclass
class SweepState:
    epoch: str
    identity: dict[str, Any]
    shards: dict[str, KnownShard] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    retired: list[dict[str, Any]] = field(default_factory=list)
    nights: list[dict[str, Any]] = field(default_factory=list)
    watermark: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def fresh(cls, identity: dict[str, Any]) -> SweepState:
        # When it started and what it is of: epochs of two identities never share a name.
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return cls(epoch=f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{digest}", identity=identity)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_NAME


def load_state(output_dir: str | Path) -> SweepState | None:
    """The state in ``output_dir``, or None before the first sweep."""
    path = state_path(output_dir)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        if payload.get("format_version") != FORMAT_VERSION:
            raise StateError(f"sweep state {path} has format_version {payload.get('format_version')}; "
                             f"this library reads {FORMAT_VERSION}")
        payload["shards"] = {name: KnownShard(**shard) for name, shard in payload["shards"].items()}
        payload["groups"] = {name: Group(**group) for name, group in payload["groups"].items()}
        return SweepState(**payload)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise StateError(f"corrupt sweep state {path}: {error}; restore it from a backup, or move it away "
                         "(with scores/ and current/) to start a fresh table") from error


def save_state(output_dir: str | Path, state: SweepState) -> Path:
    path = state_path(output_dir)
    write_json_atomically(path, state.to_json())
    return path
