"""One sweep at a time per output directory: :class:`attribution.lock.OutputLock` on ``<output_dir>/sweep.lock``."""

from __future__ import annotations

from attribution.lock import OutputLock, OutputLocked

LOCK_NAME = "sweep.lock"


class SweepLocked(OutputLocked):
    """Another sweep holds the lock on this output directory."""


class SweepLock(OutputLock):
    job = "sweep"
    error = SweepLocked

    def how_to_clear(self) -> str:
        return f"If no sweep is running on this output directory, delete {self.path} or rerun with sweep.break_lock=true."
