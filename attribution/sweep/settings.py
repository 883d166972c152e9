"""The ``sweep`` section of conf/sweep.yaml as a typed dataclass (the library reads no Hydra objects)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from attribution.settings import SettingsError

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class SweepSettings:
    # The night this sweep is filed under (YYYY-MM-DD); null = today in UTC. Set it to backfill.
    date: str | None = None
    # Remove a lock left by another sweep without checking it; only when you know none runs.
    break_lock: bool = False
    # A shard that disappeared from data.path: false keeps its rows (and says so), true removes them.
    drop_missing_shards: bool = False
    # Re-hash every shard's content; false trusts an unchanged (size, mtime) to mean unchanged content.
    rehash: bool = False

    def __post_init__(self) -> None:
        if self.date is not None:
            try:
                valid = bool(_DATE.match(str(self.date))) and bool(datetime.strptime(str(self.date), "%Y-%m-%d"))
            except ValueError:  # the right shape but not a calendar date (2025-13-01)
                valid = False
            if not valid:
                raise SettingsError(f"sweep.date={self.date!r}; expected a date YYYY-MM-DD, or null (today, UTC)")

    def night(self) -> str:
        """The sweep date: ``date`` or today in UTC."""
        return str(self.date) if self.date is not None else datetime.now(UTC).strftime("%Y-%m-%d")
