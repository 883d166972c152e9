"""Shard discovery and what a night must score.

A shard is identified by its absolute path and its content (sha256, the fingerprint the
prefilter index uses, so both agree on what "the same shard" is). Hashing a large corpus
every night is expensive, so a shard whose size and mtime match the state reuses the
recorded hash unless ``sweep.rehash=true``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from attribution.data.corpus import list_shards
from attribution.prefilter.manifest import shard_fingerprint


@dataclass(frozen=True)
class ShardFile:
    """One corpus file as seen tonight."""

    path: str  # absolute, not resolved through symlinks: the name users know it by
    sha256: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class KnownShard:
    """A shard as the state recorded it when it was swept."""

    sha256: str
    size: int
    mtime_ns: int
    group: str
    swept_on: str


def discover(data_path: str | Path, known: Mapping[str, KnownShard], rehash: bool = False) -> dict[str, ShardFile]:
    """Every shard under ``data_path`` (file, directory or glob) with its content fingerprint."""
    shards = {}
    for path in list_shards(data_path):
        absolute = os.path.abspath(path)
        stat = Path(absolute).stat()
        previous = known.get(absolute)
        if previous is not None and not rehash and (previous.size, previous.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            digest = previous.sha256
        else:
            digest = shard_fingerprint(Path(absolute))
        shards[absolute] = ShardFile(absolute, digest, stat.st_size, stat.st_mtime_ns)
    return shards


@dataclass
class NightPlan:
    """What tonight does, by shard path.

    ``new`` were never swept; ``changed`` were swept with other content; ``regrouped`` are
    unchanged shards re-scored because they were swept together with a changed (or dropped)
    shard: a group's rows are the top-k over all its shards, so they can only be replaced
    whole. ``retired`` groups are superseded tonight.
    """

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    regrouped: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)

    @property
    def pending(self) -> list[str]:
        return sorted(self.new + self.changed + self.regrouped)

    @property
    def nothing_to_do(self) -> bool:
        return not self.pending and not self.retired


def plan_night(current: Mapping[str, ShardFile], known: Mapping[str, KnownShard], drop_missing: bool) -> NightPlan:
    """Compare tonight's shards with the state: which to score, which groups to replace."""
    plan = NightPlan()
    retired: set[str] = set()
    for path, shard in sorted(current.items()):
        previous = known.get(path)
        if previous is None:
            plan.new.append(path)
        elif previous.sha256 != shard.sha256:
            plan.changed.append(path)
            retired.add(previous.group)
    plan.missing = sorted(set(known) - set(current))
    if drop_missing:
        retired.update(known[path].group for path in plan.missing)
    for path in sorted(set(current) - set(plan.new) - set(plan.changed)):
        (plan.regrouped if known[path].group in retired else plan.unchanged).append(path)
    plan.retired = sorted(retired)
    return plan
